"""The quantatlas command line: one entry point, sub-commands."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="quantatlas: run quantization experiments, measure them KLD-first, file them in the atlas.")
reference_app = typer.Typer(no_args_is_help=True, help="The embedded reference model.")
app.add_typer(reference_app, name="reference")


def fail(message: str) -> None:
    """A user mistake: one line on stderr, exit code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _user_error(e: Exception, spec_path: Path | None) -> str:
    """Prefix a field error with `file:line` when the message starts with a dotted field path."""
    from quantatlas.spec import SpecError, field_line

    msg = str(e)
    if isinstance(e, SpecError) or spec_path is None:
        return msg
    m = re.match(r"^((?:arms|data|model|seeds|control|criterion)[\w.\-]*)\s*:", msg)
    field = m.group(1) if m else None
    if field is None and msg.startswith("model "):
        field = "model"
    line = field_line(spec_path, field) if field else None
    where = f"{spec_path}:{line}" if line else str(spec_path)
    return f"{where}: {msg if not field or msg.startswith(field + ':') else 'field ' + field + ': ' + msg}"


@app.command()
def run(spec: Path = typer.Argument(..., help="experiment spec (YAML)"),
        json_path: Optional[Path] = typer.Option(None, "--json", help="write the full results here"),
        db: Optional[str] = typer.Option(None, "--db", help="ledger URL (default $QUANTATLAS_DB or sqlite:///runs/atlas.db)"),
        device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"),
        quiet: bool = typer.Option(False, help="no progress bars"),
        compress: bool = typer.Option(True, help="measure zstd-22 / brotli-11 artifact sizes (slow on big models)")):
    """Run every arm x seed of SPEC, print the table, write JSON; re-running resumes."""
    from quantatlas.eval.windows import EvalDataError
    from quantatlas.models import ModelLoadError
    from quantatlas.runner import format_table, run_spec
    from quantatlas.spec import SpecError, load_spec

    try:
        s = load_spec(spec)
        doc = run_spec(s, json_path, db_url=db, device=device, progress=not quiet and sys.stderr.isatty(),
                       compress=compress, log=lambda m: typer.echo(m, err=True))
    except (SpecError, ModelLoadError, EvalDataError, ValueError) as e:
        fail(_user_error(e, spec))
    typer.echo(f"{doc['title']}  (model {doc['model']} {doc['model_hash']}, eval {doc['eval_fingerprint']}, "
               f"{doc['eval_tokens_scored']} tokens scored, {doc['environment']['device']})")
    typer.echo(format_table(doc))
    for v in doc.get("verdicts", []) or []:
        typer.echo(f"  {v.get('arm')}: {v.get('result')} — {v.get('text', '')}")
    if json_path:
        typer.echo(f"results: {json_path}")


@app.command()
def export(spec: Path = typer.Argument(..., help="experiment spec (YAML)"),
           arm: str = typer.Option(..., help="the arm to export"),
           seed: Optional[int] = typer.Option(None, help="seed (default: the spec's first)"),
           format: str = typer.Option("gguf", "--format", help="gguf"),
           out: Path = typer.Option(..., help="output file"),
           device: Optional[str] = typer.Option(None)):
    """Quantize one arm x seed of SPEC exactly as `run` does and write it as a file llama.cpp reads."""
    from quantatlas.export.gguf import write_gguf
    from quantatlas.models import ModelLoadError, load_model
    from quantatlas.runner import default_device, quantize_arm
    from quantatlas.spec import SpecError, load_spec

    try:
        s = load_spec(spec)
        if arm not in s.arms:
            raise SpecError(f"{spec}: --arm {arm!r} is not one of the arms ({', '.join(s.arms)})")
        if format != "gguf":
            raise SpecError(f"--format {format!r}: only gguf is supported")
        from quantatlas.quant.recipe import build_recipe

        recipe = build_recipe(s.arms[arm], f"arms.{arm}")
        lm = load_model(s.model, device=device or default_device())
        model, packed = quantize_arm(lm, s, arm, s.seeds[0] if seed is None else seed, recipe)
        ftype = recipe.mixture.ftype if recipe.mixture is not None else None
        types = write_gguf(out, model, packed, tokenizer=lm.tokenizer, ftype=ftype)
    except (SpecError, ModelLoadError, ValueError) as e:
        fail(_user_error(e, spec))
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    typer.echo(f"wrote {out} ({out.stat().st_size:,} bytes): " + ", ".join(f"{n} x {t}" for t, n in sorted(counts.items())))


@reference_app.command("train")
def reference_train(steps: int = typer.Option(1000), seed: int = typer.Option(0),
                    batch_size: int = typer.Option(8), seq_len: int = typer.Option(512),
                    device: str = typer.Option("cpu"),
                    out: Optional[Path] = typer.Option(None, help="checkpoint folder (default: the package's)")):
    """Train the reference model reproducibly and write checkpoint + card."""
    from rich.progress import Progress

    from quantatlas.reference.model import CHECKPOINT_DIR
    from quantatlas.reference.train import TrainConfig, train

    cfg = TrainConfig(steps=steps, seed=seed, batch_size=batch_size, seq_len=seq_len, device=device)
    with Progress() as p:
        task = p.add_task("training", total=steps)
        card = train(cfg, out or CHECKPOINT_DIR,
                     progress=lambda s, n, loss: p.update(task, completed=s, description=f"training loss {loss:.3f}"))
    typer.echo(f"validation bits per byte: {card['validation_bits_per_byte']}  ({card['train_seconds']} s)")


def _mount_atlas() -> None:
    from quantatlas.atlas.cli import app as atlas_app
    from quantatlas.web.cli import register

    app.add_typer(atlas_app, name="atlas", help="The ledger: list, show, import, export, merge, reproduce, tokens.")
    register(app, atlas_app)  # serve, push, pull, atlas token ...


_mount_atlas()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
