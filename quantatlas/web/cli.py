"""`quantatlas serve | push | pull` and `quantatlas atlas token create | list | revoke`.

    from quantatlas.web.cli import register
    register(app, atlas_app)          # in quantatlas/cli.py

User mistakes print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import os
from typing import Optional

import typer

from quantatlas.atlas.cli import DB_HELP, text_table, user_errors
from quantatlas.errors import UserError

TOKEN_HELP = "contributor token (default $QUANTATLAS_TOKEN); made on the server by `quantatlas atlas token create NAME`"


def _ledger(db: str | None):
    from quantatlas.atlas.ledger import Ledger

    return Ledger(db)


@user_errors
def serve(db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
          host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback unless told otherwise)"),
          port: int = typer.Option(8000, "--port", min=1, max=65535),
          max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="largest request body accepted (MiB)"),
          max_request_tokens: int = typer.Option(1 << 25, "--max-request-tokens", min=1,
                                                 help="per-token KLD values one push may carry in all its runs "
                                                      "(decompressed: 4 bytes each), checked before decompressing")):
    """Serve the atlas (pages and JSON API) over the ledger."""
    import uvicorn

    from quantatlas.web.app import create_app

    if not max_body_mb > 0:
        raise UserError(f"--max-body-mb must be positive, got {max_body_mb}", "--max-body-mb")
    app = create_app(db, max_body_bytes=max(1024, int(max_body_mb * (1 << 20))),
                     max_request_tokens=max_request_tokens)
    typer.echo(f"quantatlas atlas on http://{host}:{port}  (ledger {app.state.ledger.url})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@user_errors
def push(to: str = typer.Option(..., "--to", help="the atlas server, e.g. http://127.0.0.1:8000"),
         token: Optional[str] = typer.Option(None, "--token", help=TOKEN_HELP),
         as_token_owner: bool = typer.Option(False, "--as-token-owner",
                                             help="also push the runs recorded here under $QUANTATLAS_CONTRIBUTOR "
                                                  "or the login name, as the token's contributor"),
         db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Send your local runs that the server lacks (idempotent: pushing twice adds nothing)."""
    from quantatlas.atlas.push import push as push_runs

    with _ledger(db) as led:
        s = push_runs(led, to, token or os.environ.get("QUANTATLAS_TOKEN"), as_token_owner=as_token_owner)
    typer.echo(f"pushed {s['runs']} new run(s) as {s['contributor']} ({s['runs_existing']} already there), "
               f"{s['experiments']} new experiment(s) ({s['experiments_existing']} already there), "
               f"{s['batches']} request(s)")
    if s["as_token_owner"]:
        moved = s["as_token_owner"]
        typer.echo(f"  pushed {moved['runs']} run(s) of {moved['local']} as {s['contributor']} "
                   f"({moved['existing']} already there)")
    if s["hint"]:
        typer.echo(f"  {s['hint']}")
    elif s["skipped_other_contributors"]:
        typer.echo(f"  {s['skipped_other_contributors']} run(s) by other contributors not pushed "
                   f"(each contributor pushes their own)")
    for old, new in s["renamed"].items():
        typer.echo(f"  {old} is {new} on the server (same spec)")
    for exp, fields in (s.get("kept") or {}).items():
        typer.echo(f"  {exp}: the server keeps its own {', '.join(fields)} (an experiment belongs to the atlas; "
                   f"your tags are stored as yours)")


@user_errors
def pull(from_url: str = typer.Option(..., "--from", help="the atlas server, e.g. http://127.0.0.1:8000"),
         token: Optional[str] = typer.Option(None, "--token", help="token, if the server asks for one"),
         db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Fetch the server's experiments and the runs this ledger lacks (idempotent)."""
    from quantatlas.atlas.push import pull as pull_runs

    with _ledger(db) as led:
        s = pull_runs(led, from_url, token or os.environ.get("QUANTATLAS_TOKEN"))
    typer.echo(f"pulled {s['runs']} new run(s) ({s['runs_existing']} already here), {s['experiments']} new "
               f"experiment(s) ({s['existing']} already here), {s['merged']} merge(s)")
    for old, new in s["renamed"].items():
        typer.echo(f"  {old} is {new} here (same spec)")


@user_errors
def token_create(name: str = typer.Argument(..., help="the contributor the token pushes as"),
                 db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Create a push token for contributor NAME; it is printed once (only its hash is stored)."""
    from quantatlas.atlas.tokens import create_token

    with _ledger(db) as led:
        token = create_token(led, name)
    typer.echo(token)
    typer.echo(f"token for contributor {name.strip()!r}: shown once, store it now "
               f"(quantatlas push --to URL --token ...)", err=True)


@user_errors
def token_list(db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """The tokens (their first characters only), their contributors, and whether revoked."""
    from quantatlas.atlas.tokens import list_tokens

    with _ledger(db) as led:
        rows = list_tokens(led)
    if not rows:
        typer.echo("no tokens")
        return
    typer.echo(text_table(["token", "contributor", "created", "state"], [
        [f"{t['prefix']}…", t["contributor"], t["created_at"][:19],
         f"revoked {t['revoked_at'][:19]}" if t["revoked_at"] else "live"] for t in rows]))


@user_errors
def token_revoke(prefix: str = typer.Argument(..., help="the token, or its first characters (see `token list`)"),
                 db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Revoke a token: it stops working at once; the runs it pushed stay."""
    from quantatlas.atlas.tokens import revoke_token

    with _ledger(db) as led:
        who = revoke_token(led, prefix)
    typer.echo(f"revoked a token of {who}")


def register(app: typer.Typer, atlas_app: typer.Typer) -> None:
    """Add `serve`, `push`, `pull` to `app` and `token create|list|revoke` to `atlas_app`."""
    app.command("serve")(serve)
    app.command("push")(push)
    app.command("pull")(pull)
    token_app = typer.Typer(no_args_is_help=True, add_completion=False,
                            help="Contributor tokens for pushing to this ledger's server.")
    token_app.command("create")(token_create)
    token_app.command("list")(token_list)
    token_app.command("revoke")(token_revoke)
    atlas_app.add_typer(token_app, name="token")
