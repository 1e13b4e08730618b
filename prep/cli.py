"""`prep`: synthesize an archive, inspect a pair, build and verify WebDataset shards."""

from __future__ import annotations

import typer

from prep.commands import build, inspect, synth, synth_cd, verify

app = typer.Typer(
    name="prep",
    help="Turn a screening-mammography archive (VinDr-Mammo layout) into aligned contralateral "
    "patch pairs: WebDataset shards + Parquet manifests.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
)
app.command("synth")(synth.synth)
app.command("synth-cd")(synth_cd.synth_cd)
app.command("inspect")(inspect.inspect)
app.command("build-shards")(build.build_shards)
app.command("verify")(verify.verify)

if __name__ == "__main__":
    app()
