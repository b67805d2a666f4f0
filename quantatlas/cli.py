"""The quantatlas command line: one entry point, sub-commands."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import typer.core


class _Commands(typer.core.TyperGroup):
    """`run --ray [ADDRESS]`: ADDRESS is optional (click options need a value), so a bare `--ray` (last,
    before another option, or before the spec file) gets the value `local`."""

    def parse_args(self, ctx, args):
        args = list(args)
        if args[:1] == ["run"] and "--ray" in args:
            i = args.index("--ray") + 1
            if i == len(args) or args[i].startswith("-") or Path(args[i]).suffix in (".yaml", ".yml", ".json"):
                args.insert(i, "local")
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="quantatlas: run quantization experiments, measure them KLD-first, file them in the atlas.")
reference_app = typer.Typer(no_args_is_help=True, help="The embedded reference model.")
app.add_typer(reference_app, name="reference")


def fail(message: str) -> None:
    """A user mistake: one line on stderr, exit code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def check_device_option(device: str | None) -> None:
    """A --device torch cannot compute on here: one line, exit 2, before anything is read or loaded."""
    from quantatlas.environment import check_device
    from quantatlas.errors import UserError

    if device is not None:
        try:
            check_device(device)
        except UserError as e:
            fail(str(e))


def _user_error(e: ValueError, spec_path: Path | None) -> str:
    """One line for a user mistake. A SpecError names its own file and line; another UserError about a
    spec field (`e.field`) gets `file:line` of that field in the spec and, unless its message starts
    with the field, `field <field>: `; any other error gets the spec's file name."""
    from quantatlas.errors import UserError
    from quantatlas.spec import SpecError, field_line

    msg = str(e)
    if isinstance(e, SpecError) or spec_path is None:
        return msg
    field = e.field if isinstance(e, UserError) else None
    line = field_line(spec_path, field) if field else None
    where = f"{spec_path}:{line}" if line else str(spec_path)
    return f"{where}: {msg if not field or msg.startswith(field + ':') else 'field ' + field + ': ' + msg}"


@app.command()
def run(spec: Path = typer.Argument(..., help="experiment spec (YAML)"),
        json_path: Optional[Path] = typer.Option(None, "--json", help="write the full results here"),
        db: Optional[str] = typer.Option(None, "--db", help="ledger URL (default $QUANTATLAS_DB or sqlite:///runs/atlas.db)"),
        device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"),
        quiet: bool = typer.Option(False, help="no progress bars"),
        compress: bool = typer.Option(True, help="measure zstd-22 / brotli-11 artifact sizes (slow on big models)"),
        ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                          help="run arms x seeds as Ray tasks: on a local Ray without ADDRESS, "
                                               "else on the cluster at ADDRESS (auto, host:6379, ray://host:10001)"),
        ray_cpus: Optional[int] = typer.Option(None, "--ray-cpus", min=1, help="CPUs of the local Ray (default: all)"),
        task_cpus: int = typer.Option(1, "--task-cpus", min=1, help="CPUs (torch threads) per Ray task"),
        retries: int = typer.Option(1, "--retries", min=0, help="retries of a failed Ray task")):
    """Run every arm x seed of SPEC, print the table, write JSON; re-running resumes. A spec with
    `models: [...]` runs one experiment per model (quantatlas/study.py) and prints each, then the study."""
    from quantatlas.runner import format_table
    from quantatlas.spec import load_spec
    from quantatlas.study import run_study

    check_device_option(device)
    try:
        s = load_spec(spec)
        common = dict(db_url=db, device=device, progress=not quiet, compress=compress,
                      log=lambda m: typer.echo(m, err=True))
        if ray is None:
            doc = run_study(s, json_path, **common)
        else:
            from quantatlas.sweep import RayMissing

            try:
                doc = run_study(s, json_path, ray=ray, ray_options=dict(num_cpus=ray_cpus, task_cpus=task_cpus,
                                                                        retries=retries), **common)
            except RayMissing as e:
                fail(str(e))
    except ValueError as e:  # a UserError (spec, model, eval data ...); any other ValueError prints as it is
        fail(_user_error(e, spec))
    docs = list(doc["results"].values()) if "results" in doc else [doc]   # a study: each model's document
    for d in docs:
        typer.echo(f"{d['title']}  (model {d['model']} {d['model_hash']}, eval {d['eval_fingerprint']}, "
                   f"{d['eval_tokens_scored']} tokens scored, {d['environment']['device']})")
        typer.echo(format_table(d))
        for v in d.get("verdicts", []) or []:
            typer.echo(f"  {v.get('arm')}: {v.get('result')} — {v.get('text', '')}")
    if doc.get("study_verdicts"):
        from quantatlas.atlas.studies import format_study

        typer.echo(format_study(doc["study_verdicts"]))
    if json_path:
        typer.echo(f"results: {json_path}" + (f" (each model's also in {', '.join(doc['files'].values())})"
                                               if doc.get("files") else ""))
    failures = [(d["model"] + ": " if len(docs) > 1 else "", f) for d in docs for f in d.get("failures", [])]
    for on, f in failures:
        typer.echo(f"failed: {on}{f['arm']} seed {f['seed']}: {f['error']}", err=True)
    if failures:
        raise typer.Exit(1)


@app.command()
def export(spec: Path = typer.Argument(..., help="experiment spec (YAML)"),
           arm: str = typer.Option(..., help="the arm to export"),
           seed: Optional[int] = typer.Option(None, min=0, max=2 ** 32 - 1, help="seed (default: the spec's first)"),
           format: str = typer.Option("gguf", "--format", help="gguf (a file llama.cpp reads) or compressed-tensors "
                                                                "(a Hugging Face folder vLLM and transformers load)"),
           out: Path = typer.Option(..., help="output file (gguf) or folder (compressed-tensors)"),
           device: Optional[str] = typer.Option(None)):
    """Quantize one arm x seed of SPEC exactly as `run` does and write it as a runtime loads it."""
    from quantatlas.export.gguf import gguf_arch, write_gguf
    from quantatlas.models import load_model
    from quantatlas.measure import quantize_arm
    from quantatlas.runner import default_device
    from quantatlas.spec import SpecError, load_spec

    check_device_option(device)
    try:
        s = load_spec(spec)
        if arm not in s.arms:
            raise SpecError(f"{spec}: --arm {arm!r} is not one of the arms ({', '.join(s.arms)})")
        if format not in ("gguf", "compressed-tensors"):
            raise SpecError(f"--format {format!r}: one of gguf, compressed-tensors")
        if format == "compressed-tensors":
            from quantatlas.export.schemes import check_arm
        else:
            from quantatlas.export.gguf import check_arm
        check_arm(s.arms[arm], f"arms.{arm}")   # refused before any compute
        lm = load_model(s.one_model("export"), device=device or default_device())
        if format == "gguf":
            gguf_arch(lm.model)                  # an architecture llama.cpp has, before quantizing
        qm = quantize_arm(lm, s, arm, s.seeds[0] if seed is None else seed)
        if format == "compressed-tensors":
            from quantatlas.export.compressed_tensors import write_compressed_tensors

            info = write_compressed_tensors(out, qm.model, qm.packed, s.arms[arm], tokenizer=lm.tokenizer,
                                            input_amax=qm.records.get("act_static_amax"))
            counts = {}
            for f in info["schemes"].values():
                counts[f] = counts.get(f, 0) + 1
            typer.echo(f"wrote {out} (compressed-tensors {info['format']}, {', '.join(info['files'])}): "
                       + ", ".join(f"{n} x {f}" for f, n in sorted(counts.items()))
                       + (f"; kv cache {info['kv_cache_scheme']['type']}{info['kv_cache_scheme']['num_bits']}"
                          if info["kv_cache_scheme"] else ""))
            return
        codec = s.arms[arm].codec
        ftype = codec.ftype.upper() if codec is not None and codec.name == "gguf" else None
        types = write_gguf(out, qm.model, qm.packed, tokenizer=lm.tokenizer, ftype=ftype)
    except ValueError as e:  # a UserError (spec, model ...); any other ValueError (gguf export's) prints as it is
        fail(_user_error(e, spec))
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    typer.echo(f"wrote {out} ({out.stat().st_size:,} bytes): " + ", ".join(f"{n} x {t}" for t, n in sorted(counts.items())))


@reference_app.command("train")
def reference_train(steps: int = typer.Option(1000), seed: int = typer.Option(0),
                    batch_size: int = typer.Option(8),
                    seq_len: int = typer.Option(512, help="at most the model's context (1024)"),
                    device: str = typer.Option("cpu"),
                    out: Optional[Path] = typer.Option(None, help="checkpoint folder (default: the package's)"),
                    arch: str = typer.Option("qwen3", help="qwen3 (model: reference), llama (reference-llama) "
                                                           "or qwen3_moe (reference-moe)")):
    """Train a reference model reproducibly and write checkpoint + card."""
    from rich.progress import Progress

    from quantatlas.errors import UserError
    from quantatlas.reference.train import TrainConfig, check_config, train

    cfg = TrainConfig(steps=steps, seed=seed, batch_size=batch_size, seq_len=seq_len, device=device)
    try:   # sizes, the context, the device: refused in one line before anything is built
        check_config(cfg, arch)
    except UserError as e:
        fail(str(e))
    with Progress() as p:
        task = p.add_task("training", total=steps)
        card = train(cfg, out, arch=arch,
                     progress=lambda s, n, loss: p.update(task, completed=s, description=f"training loss {loss:.3f}"))
    typer.echo(f"validation bits per byte: {card['validation_bits_per_byte']}  ({card['train_seconds']} s)")


@app.command("context-slope")
def context_slope_cmd(runs: list[Path] = typer.Argument(..., help="result JSONs (`run --json`) of one spec at several ctx"),
                      arm: str = typer.Option("k_int4", help="the arm whose KLD the gap starts from"),
                      minus: str = typer.Option("v_int4", help="the arm subtracted")):
    """Slope of the KLD gap (arm − minus) against the eval ctx, with a 95 % interval over seeds × ctx."""
    from quantatlas.context_slope import context_slope, format_slope, load_docs

    try:
        typer.echo(format_slope(context_slope(load_docs(runs), arm, minus)))
    except (ValueError, KeyError, OSError) as e:
        fail(str(e))


@app.command()
def sensitivity(spec: Path = typer.Argument(..., help="experiment spec (YAML) with an arm that has `allocate:`"),
                arm: Optional[str] = typer.Option(None, help="the arm (default: the first with `allocate:`)"),
                seeds: Optional[str] = typer.Option(None, help="calibration seeds, comma-separated (default: the spec's)"),
                grouping: Optional[str] = typer.Option(None, help="role_layer, role or layer (default: the arm's)"),
                limit: int = typer.Option(30, help="rows of the ROI table to print"),
                json_path: Optional[Path] = typer.Option(None, "--json", help="write the measurements here"),
                ledger: bool = typer.Option(True, help="store the measurements in the ledger"),
                db: Optional[str] = typer.Option(None, "--db", help="ledger URL (default $QUANTATLAS_DB or sqlite:///runs/atlas.db)"),
                device: Optional[str] = typer.Option(None)):
    """ΔKLD of moving each tensor group from the arm's codec to each `allocate.candidates` codec, on
    calibration tokens, and the bits it costs: the ranked ROI table and the per-role summary."""
    import json

    from quantatlas.models import load_model
    from quantatlas.quant.quantize import calibration_tokens
    from quantatlas.quant.sensitivity import GROUPINGS, format_roi, measure_sensitivity, role_summary
    from quantatlas.spec import load_spec
    from quantatlas.tables import plain_table, render

    check_device_option(device)
    try:
        s = load_spec(spec)
        name = arm or next((n for n, a in s.arms.items() if a.allocate is not None), None)
        if name is None or name not in s.arms or s.arms[name].allocate is None:
            fail(f"{spec}: no arm {name or ''} with an `allocate:` block (its candidates are what is measured)")
        a = s.arms[name]
        group = grouping or a.allocate.grouping
        if group not in GROUPINGS:
            fail(f"--grouping must be one of {', '.join(GROUPINGS)}, got {group!r}")
        seed_list = list(s.seeds)
        if seeds:
            try:
                seed_list = [int(x) for x in seeds.split(",")]
            except ValueError:
                fail(f"--seeds {seeds!r}: comma-separated integers from 0 to 2^32 - 1 (e.g. 0,1,2)")
            if any(not 0 <= x < 2 ** 32 for x in seed_list):
                fail(f"--seeds {seeds!r}: a seed must be an integer from 0 to 2^32 - 1")
        lm = load_model(s.one_model("sensitivity"), device=device or "cpu")
        stream = lm.text_tokens(s.data.calib.source, "train")
        c = a.calib or s.data.calib
        led = exp_id = None
        if ledger:
            from quantatlas.atlas.ledger import Ledger

            led = Ledger(db)
            exp_id = led.register_experiment(s.to_dict())
        out = []
        for seed in seed_list:
            calib = calibration_tokens(stream, c.samples, c.seq_len, seed)
            sens = measure_sensitivity(lm, a.model_copy(update={"allocate": None}), list(a.allocate.candidates),
                                       calib, seed, group)
            typer.echo(f"seed {seed}:")
            typer.echo(format_roi(sens, limit))
            typer.echo(f"per role (first candidate; ΔKLD summed over the role's {group} groups):")
            roles = plain_table(("role", "left"), ("candidate", "left"), ("ΔKLD", "right"), ("± SE", "right"),
                                ("Δbits/wt", "right"), ("ROI", "right"))
            for r in role_summary(sens):
                roles.add_row(r["role"], r["candidate"], f"{r['delta_kld']:+.5f}", f"{r['delta_kld_se']:.5f}",
                              f"{r['delta_bpw']:+.4f}", f"{r['roi']:.4g}")
            typer.echo(render(roles))
            out.append(sens.to_dict())
            if led is not None:
                led.record_sensitivity(exp_id, name, seed, out[-1], sens.rows(), lm.model_hash)
                typer.echo(f"ledger: experiment {exp_id}, arm {name}, seed {seed}")
    except ValueError as e:  # a UserError (spec, model ...); any other ValueError prints as it is
        fail(_user_error(e, spec))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"spec": str(spec), "arm": name, "model": s.model, "seeds": out}, indent=1))
        typer.echo(f"measurements: {json_path}")


@app.command()
def suggest(model: Optional[str] = typer.Option(None, "--model", help="only on this model (name or hash prefix)"),
            limit: int = typer.Option(10, "--limit", min=1, help="how many suggestions to list"),
            out: Optional[Path] = typer.Option(None, "--out", help="write the first suggestion's spec here (with the "
                                                                  "others listed that share its base and control)"),
            db: Optional[str] = typer.Option(None, "--db", help="ledger URL (default $QUANTATLAS_DB or sqlite:///runs/atlas.db)")):
    """Experiments left to try, ranked by expected improvement over the frontier (the atlas's /left-to-try)."""
    import yaml

    from quantatlas.atlas.ledger import Ledger
    from quantatlas.web.suggestions import format_suggestions, merged_spec, suggestions

    try:
        with Ledger(db) as led:
            found = suggestions(led, limit, model)
    except ValueError as e:
        fail(str(e).splitlines()[0])
    if not found:
        if out is not None:
            fail(f"nothing to suggest{f' on model {model}' if model else ''}: the atlas has no measured quantized arm "
                 "to start from, so --out was not written")
        typer.echo("nothing to suggest: no measured quantized arm yet")
        return
    typer.echo(format_suggestions(found))
    if out is not None:
        spec = merged_spec(found)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        typer.echo(f"spec: {out} (arms {', '.join(spec['arms'])}; run it with quantatlas run {out})")


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
