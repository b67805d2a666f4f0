// Draw every plot whose figure (plotly data + layout) the server embedded as JSON, and make
// points that carry a URL (customdata[0]) open it on click.
(function () {
  function draw(div) {
    var figure = JSON.parse(document.getElementById(div.dataset.figure).textContent);
    Plotly.newPlot(div, figure.data, figure.layout, {displaylogo: false, responsive: true}).then(function () {
      div.dataset.rendered = "1";
    });
    div.on("plotly_click", function (event) {
      var p = event.points && event.points[0];
      if (p && p.customdata && typeof p.customdata[0] === "string" && p.customdata[0].charAt(0) === "/") {
        window.location.href = p.customdata[0];
      }
    });
  }
  document.querySelectorAll("div.plot[data-figure]").forEach(draw);
})();
