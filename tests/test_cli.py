"""The command line's contract: exit codes, one-line errors on stderr, nothing on stdout."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import photo_like
from icmsr_cli import __version__
from icmsr_cli.cli import app


def run(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"icmsr {__version__}"


def test_help_explains_every_flag():
    result = run("upscale", "--help")
    for flag in ("--output", "--scale", "--model", "--base", "--lora", "--prompt", "--color-fix", "--device", "--dtype", "--tile"):
        assert flag in result.stdout
    # Typer 0.29 adds its own "..." after a metavar that already had them: "{INPUT...}..."
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert "INPUT" in usage and "...}" not in usage and "......" not in usage, usage
    # what each argument is: Typer before 0.26 lost arguments' help under click 8.5 (click's own
    # Parameter.__init__ set it back to None), leaving "INPUT [required]" unexplained
    wide = {command: CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"}).stdout
            for command in ("upscale", "weights convert")}
    assert "Image files, directories, globs, or - for standard input." in wide["upscale"]
    assert "OSEDiff-format .pkl checkpoint." in wide["weights convert"] and "Output .safetensors file" in wide["weights convert"]
    # each value is named for what it is (Typer 0.2x showed <str>, and <bool> beside flags, which take none)
    for command in (["upscale"], ["eval"], ["weights", "download"], ["weights", "convert"], []):
        for line in CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).stdout.splitlines():
            if " --" in line and "--help" not in line:
                assert not any(kind in line for kind in ("<str>", "<bool>", "<float>", "<int")), line
            if "Usage:" in line:  # arguments are named as the help's prose names them: TARGET, not {target}
                arguments = line.split("[OPTIONS]")[-1]
                assert arguments == arguments.upper(), line


@pytest.mark.parametrize("command", [["upscale"], ["eval"], ["weights", "list"], ["weights", "verify"]])
def test_help_prose_fills_an_80_column_terminal(command):
    """Typer keeps a docstring's line breaks (0.2x on): help wrapped at 100 columns in the source
    broke again mid-line in an 80-column terminal ("(LOCAL_RANK) and claims" alone on a line).
    A line of prose ends only where the next word would not fit, or at a paragraph's end."""
    width = 80
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0
    prose = result.stdout.split("\u256d")[0].splitlines()  # up to the first panel's corner
    prose = [line.rstrip() for line in prose if not line.strip().startswith("Usage:")]
    assert max(map(len, prose)) <= width
    for line, after in zip(prose, prose[1:]):
        if line and after:
            assert len(line) + 1 + len(after.split()[0]) > width - 2, (line, after)


def test_upscale_writes_exact_size_and_keeps_stdout_clean(tmp_path, tiny_base, tiny_lora):
    src, dst = tmp_path / "odd.png", tmp_path / "big.png"
    Image.fromarray(photo_like(45, 31)).save(src)
    result = run("upscale", src, "-o", dst, "--base", tiny_base, "--lora", tiny_lora, "-s", "2.5", "--tile", "off")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "big.png" in result.stderr
    assert Image.open(dst).size == (112, 78)  # round(45*2.5)=112 (half to even), round(31*2.5)=78
    # "2x" and "x2", as other upscalers name their factors, were refused with a parser's message;
    # --color-fix took only lower case, where --format, --device and --dtype take any
    for factor in ("2x", "X2"):
        result = run("upscale", src, "-o", dst, "--base", tiny_base, "--lora", tiny_lora, "-s", factor, "--tile", "off", "--overwrite",
                     "--color-fix", "AdaIN")
        assert result.exit_code == 0, result.output
        assert Image.open(dst).size == (90, 62), factor


def test_missing_input_is_one_line_and_exit_1(tmp_path, tiny_base, tiny_lora):
    result = run("upscale", tmp_path / "absent.png", "-o", tmp_path / "o.png", "--base", tiny_base, "--lora", tiny_lora)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"error: {tmp_path / 'absent.png'}: no such file, folder or matching image"
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.png").exists()
    result = run("upscale", tmp_path / "absent.png", "-o", tmp_path / "o.png", "--json")
    record = json.loads(result.stdout)
    assert result.exit_code == 1 and record["status"] == "failed"
    assert record["output"] is None  # it said "-", which names standard output


def test_the_model_loads_only_for_an_input_that_reads(tmp_path, tiny_base, tiny_lora):
    """An input that cannot be read (an iPhone's HEIC without pillow-heif, a damaged file) failed
    only after the model had loaded, or after its weights had downloaded on a first run; with a
    --base that does not exist the run ended on the model's error and never named the file."""
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\0\0\0\x1cftypheic\0\0\0\0mif1heicmiaf" + bytes(64))
    result = run("upscale", heic, "-o", tmp_path / "o.png", "--base", tmp_path / "no-model", "--lora", tiny_lora)
    assert result.exit_code == 1, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {heic}: HEIC/HEIF photos need the pillow-heif package")
    # a file that reads after files that do not: the model loads for it, and each file is told in order
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (folder / "b.heic").write_bytes(heic.read_bytes())
    Image.fromarray(photo_like(16, 12)).save(folder / "c.png")
    result = run("upscale", folder, "-o", tmp_path / "out", "--base", tiny_base, "--lora", tiny_lora, "--tile", "off", "--json")
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(Path(r["input"]).name, r["status"]) for r in records] == [("a.png", "failed"), ("b.heic", "failed"), ("c.png", "done")]
    assert Image.open(tmp_path / "out" / "c.png").size == (64, 48)


def test_setup_errors_exit_2_without_traceback(tmp_path, tiny_base, tiny_lora):
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    result = run("upscale", src, "-o", tmp_path / "o.png", "--base", tmp_path / "nowhere", "--lora", tiny_lora)
    assert result.exit_code == 2 and "no such folder" in result.stderr and "Traceback" not in result.output
    # a file where a folder belongs and the other way round are named as such, not as missing
    result = run("upscale", src, "-o", tmp_path / "o.png", "--base", tiny_lora, "--lora", tiny_lora)
    assert result.exit_code == 2 and result.stderr.strip() == f"error: --base {tiny_lora}: a file, not a model folder"
    result = run("upscale", src, "-o", tmp_path / "o.png", "--base", tiny_base, "--lora", tmp_path)
    assert result.exit_code == 2 and result.stderr.strip() == f"error: --lora {tmp_path}: a folder, not a checkpoint file"
    result = run("upscale", src, "-o", tmp_path / "o.png", "--color-fix", "sepia")
    assert result.exit_code == 2 and "sepia" in result.stderr
    result = run("upscale", src, "-o", tmp_path / "o.png", "--tile", "huge")
    assert result.exit_code == 2 and "huge" in result.stderr
    result = run("upscale", src, "-o", tmp_path / "o.png", "--max-pixels", "0")  # it refused every image, one by one
    assert result.exit_code == 2 and "--max-pixels" in result.stderr


def test_a_wrong_output_is_refused_before_the_model(tmp_path, monkeypatch):
    """Outputs no file can fix are refused before the model loads (the base here does not exist, so
    reaching the model would fail on it): an unwritable suffix is a usage error for the whole run
    (it exited 1, as one file's failure), several inputs into a new name ending in .png do not make
    a folder of that name (they did), an output folder that cannot be made is refused (each file
    ran the model, then failed), and an output over its own input fails without loading anything
    (it loaded the model first)."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        Image.fromarray(photo_like(8, 8)).save(path)
    nowhere = ("--base", tmp_path / "nowhere")
    result = run("upscale", a, "-o", tmp_path / "o.gif", *nowhere)
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {tmp_path / 'o.gif'}: cannot write .gif; use .png, .jpg, .webp, .tiff or .bmp"
    result = run("upscale", a, b, "-o", tmp_path / "big.png", *nowhere)
    assert result.exit_code == 2 and "names an image file" in result.stderr and "end it with /" in result.stderr
    assert not (tmp_path / "big.png").exists()
    # a glob means a folder whatever it matches: one match made a file named like the folder
    from icmsr_cli.io import batch

    jobs, _ = batch.plan([str(tmp_path / "a*.png")], str(tmp_path / "out"))
    assert [j.target for j in jobs] == [tmp_path / "out" / "a.png"]
    monkeypatch.setenv("HOME", str(tmp_path))  # a quoted ~ is icmsr's to expand, as in a plain name
    assert [j.source for j in batch.plan(["~/a*.png"], str(tmp_path / "out"))[0]] == [a]
    result = run("upscale", tmp_path / "a*.png", "-o", tmp_path / "one.png", *nowhere)
    assert result.exit_code == 2 and "a glob needs an output directory, and this names an image file" in result.stderr
    result = run("upscale", a, b, "-o", f"{tmp_path / 'big.png'}/", *nowhere, "-s", "1", "--lora", tmp_path / "nowhere.pkl")
    assert result.exit_code == 2 and "nowhere" in result.stderr  # asked for with a trailing /: on to the model
    result = run("upscale", a, b, "-o", f"{a}/sub/", *nowhere)  # each file ran the model, then failed to write
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {a}/sub/a.png: cannot be written: {a} is a file, not a folder"
    before = a.read_bytes()
    result = run("upscale", a, "-o", a, "--overwrite", *nowhere)
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: {a}: the output would overwrite the input; choose another output"]
    assert a.read_bytes() == before


def test_stage_bars_follow_image_after_image():
    """The stage bars are replaced image by image (rich's own Progress, drawn to a buffer): a tiled
    folder in a terminal stopped at its third image with "unexpected IndexError" (exit 3), the
    bars looked up by task id in rich's list of tasks, which removing a task shifts."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from icmsr_cli.cli import _tile_progress

    bar = Progress(console=Console(file=io.StringIO(), force_terminal=True, width=100))
    update = _tile_progress(bar)
    images = bar.add_task("images", total=4)
    for tiles in (6, 1, 6, 4):  # tiled, whole (one step a stage), tiled, then an out-of-memory retry
        for stage in ("encode", "unet", "decode"):
            steps = range(tiles + 1) if tiles == 1 else range(1, tiles + 1)
            for done in steps:
                update(stage, done, tiles)
        bar.advance(images)
    update("decode", 2, 4), update("decode", 1, 16)  # halved tiles: the stage starts again
    shown = {task.description.strip(): (task.completed, task.total) for task in bar.tasks}
    assert shown == {"images": (4, 4), "encode tiles": (4, 4), "unet tiles": (4, 4), "decode tiles": (1, 16)}


def test_a_terminal_shows_where_each_file_went_above_the_bars(tmp_path, tiny_base, tiny_lora, monkeypatch):
    """With the progress bars (a terminal), a run ended on full bars and never said where the
    output went or how long it took; the lines printed off a terminal are printed above the bars."""
    import io

    from rich.console import Console

    from icmsr_cli import cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, force_terminal=True, width=100, soft_wrap=True, highlight=False, markup=False))
    for name in ("a.png", "b.png"):
        Image.fromarray(photo_like(16, 12)).save(tmp_path / name)
    result = run("upscale", tmp_path / "a.png", tmp_path / "b.png", "-o", tmp_path / "out", "--base", tiny_base, "--lora", tiny_lora)
    assert result.exit_code == 0, result.output
    text = screen.getvalue()
    assert "images" in text and "━" in text  # the bars were drawn
    for name in ("a.png", "b.png"):
        assert f"{tmp_path / name} -> {tmp_path / 'out' / name} (64x48, " in text


def test_broken_lora_is_named(tmp_path, tiny_base):
    src, bad = tmp_path / "in.png", tmp_path / "bad.pkl"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    bad.write_bytes(b"not a checkpoint")
    result = run("upscale", src, "-o", tmp_path / "o.png", "--base", tiny_base, "--lora", bad)
    assert result.exit_code == 2
    assert f"{bad}: not a readable torch checkpoint" in result.stderr


def test_weights_convert_writes_like_every_output(tmp_path, tiny_lora):
    """The converted file is written atomically with the usual permissions, into a folder made for
    it; an existing one is kept unless --overwrite; a place it cannot go is one line and exit 2."""
    from icmsr_cli.model.lora import load_lora_checkpoint

    target = tmp_path / "new" / "deeper" / "lora.safetensors"
    result = run("weights", "convert", tiny_lora, target)
    assert result.exit_code == 0, result.output
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # safetensors' own writer made it 0600
    assert [p.name for p in target.parent.iterdir()] == ["lora.safetensors"]  # no temporary left beside it
    first = load_lora_checkpoint(target)
    assert first.state_dict_unet.keys() == load_lora_checkpoint(tiny_lora).state_dict_unet.keys()

    target.write_bytes(b"someone's file")
    result = run("weights", "convert", tiny_lora, target)
    assert result.exit_code == 0 and "exists, skipped (--overwrite replaces it)" in result.stderr
    assert target.read_bytes() == b"someone's file"
    result = run("weights", "convert", tiny_lora, target, "--overwrite")
    assert result.exit_code == 0 and load_lora_checkpoint(target).rank_unet == first.rank_unet

    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    result = run("weights", "convert", tiny_lora, blocker / "lora.safetensors")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {blocker / 'lora.safetensors'}: cannot write (") and "Traceback" not in result.output
    result = run("weights", "convert", tiny_lora.parent, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {tiny_lora.parent}: a folder, not a LoRA checkpoint file"
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["upscale", "--help"], ["weights", "list"],
                                  ["eval", "{png}", "--ref", "{ref}", "--json"], ["upscale", "{png}", "-o", "{done}"]])
def test_light_commands_import_neither_torch_nor_diffusers(args, tmp_path):
    """--version, --help and weights list compute nothing, eval's psnr/ssim are numpy, and a resumed
    batch with every output done has nothing to compute: none may pay for torch (1.6 s on a CPU
    machine, 5 s on a GPU one). Run in a fresh interpreter, as a user runs them."""
    import json
    import os
    import subprocess
    import sys

    probe = ("import json, sys\nfrom icmsr_cli.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nprint(json.dumps([code, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)]),"
             " file=sys.stderr)")
    png, done, ref = tmp_path / "a.png", tmp_path / "a_x4.png", tmp_path / "hr" / "a.png"
    Image.fromarray(photo_like(16, 16)).save(png)
    Image.fromarray(photo_like(64, 64)).save(done)
    ref.parent.mkdir()
    Image.fromarray(photo_like(16, 16, seed=1)).save(ref)
    args = [a.format(png=png, done=done, ref=ref) for a in args]
    env = {**os.environ, "ICMSR_CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, timeout=120)
    code, heavy = json.loads(proc.stderr.strip().splitlines()[-1])
    assert code in (0, None), proc.stderr
    assert heavy == [], f"{' '.join(args)} imported {heavy}"


def test_a_warm_upscale_imports_neither_diffusers_nor_transformers(tmp_path, tiny_base, tiny_lora):
    """The networks are our own modules (model/unet.py, model/vae.py): importing diffusers for two
    classes cost 4.5 s of every run on the 2-core CPU (its every model, torch._dynamo, transformers,
    peft). transformers runs once, for the prompt embedding, and not again once it is cached."""
    import json
    import os
    import subprocess
    import sys

    probe = ("import json, sys\nfrom icmsr_cli.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nprint(json.dumps([code, sorted(m for m in ('diffusers', 'transformers', 'peft', 'torch._dynamo') if m in sys.modules)]),"
             " file=sys.stderr)")
    png = tmp_path / "a.png"
    Image.fromarray(photo_like(24, 16)).save(png)
    env = {**os.environ, "ICMSR_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    heavy = []
    for run_number in range(2):  # the first computes and caches the prompt embedding
        out = tmp_path / f"out{run_number}.png"
        proc = subprocess.run([sys.executable, "-c", probe, "upscale", str(png), "-o", str(out), "--base", str(tiny_base),
                               "--lora", str(tiny_lora), "-q"], capture_output=True, text=True, env=env, timeout=300)
        code, heavy = json.loads(proc.stderr.strip().splitlines()[-1])
        assert code in (0, None) and out.is_file(), proc.stderr
    assert heavy == [], f"a warm upscale imported {heavy}"
    assert (tmp_path / "out0.png").read_bytes() == (tmp_path / "out1.png").read_bytes()


def test_names_that_look_like_markup_print_as_they_are(tmp_path):
    """Messages carry file names; rich would read "[bold]" in a name as a style and drop it."""
    missing = tmp_path / "holiday [bold] [rank 0].png"
    result = run("upscale", missing, "-o", tmp_path / "o.png")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {missing}: no such file, folder or matching image"


def test_an_output_without_a_suffix_says_how_to_name_a_folder(tmp_path, monkeypatch):
    """`-o results` for one image: a folder was meant as often as a file, and the message named
    only the suffixes."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(photo_like(16, 12)).save(tmp_path / "a.png")
    result = run("upscale", "a.png", "-o", "results", "--base", tmp_path / "no-model")
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: results: cannot write files without a suffix; use .png, .jpg, .webp, .tiff or .bmp, "
        "or end it with / for a folder named results")


def test_an_empty_value_is_refused_not_taken_for_a_default(tmp_path, monkeypatch):
    """`icmsr upscale "$IN" -o "$OUT"` with a variable unset: an empty input read as the current
    folder (every image in it, "several inputs need an output directory"), an empty output as the
    current folder too (outputs mirrored into it: "the output would overwrite the input"); an
    empty option value was taken for the option left out."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(photo_like(16, 12)).save(tmp_path / "a.png")
    Image.fromarray(photo_like(16, 12, seed=1)).save(tmp_path / "b.png")
    for args, why in ((["a.png", "-o", ""], "the output is empty; name a file or folder, or - for standard output"),
                      (["", "-o", "out.png"], "an input is empty; name a file, folder or glob (. for the current folder)"),
                      (["a.png", "", "-o", "out/"], "an input is empty; name a file, folder or glob (. for the current folder)")):
        result = run("upscale", *args, "--base", tmp_path / "no-model")
        assert result.exit_code == 2 and result.stderr.strip().splitlines() == [f"error: {why}"], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    # "--base $BASE" unset was taken for --base left out: the registry's model was fetched (5 GB)
    for args, hint in ((["upscale", "a.png", "-o", "out.png", "--base", ""], "--base"),
                       (["upscale", "a.png", "-o", "out.png", "--lora", ""], "--lora"),
                       (["upscale", "a.png", "-o", "out.png", "--model", ""], "--model"),
                       (["upscale", "a.png", "-o", "out/", "--shard", ""], "--shard"),
                       (["weights", "download", ""], "NAME"), (["weights", "verify", ""], "NAME")):
        result = CliRunner().invoke(app, args, env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
        assert result.exit_code == 2 and f"Invalid value for {hint}: is empty; give a value, or leave it out" in result.stderr, result.output


def test_an_option_whose_value_was_left_out_does_not_take_the_next_option(tmp_path, monkeypatch):
    """`--prompt --overwrite` (the prompt forgotten) ran with the prompt "--overwrite" and did not
    overwrite; `-o --json` looked for an output named --json; `--ref --json` compared against a
    file of that name. An option's value that is one of the command's options is refused, naming
    both, before any work."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(photo_like(16, 12)).save(tmp_path / "a.png")
    for args, flag, taken in ((["upscale", "a.png", "-o", "out.png", "--prompt", "--overwrite"], "--prompt", "--overwrite"),
                              (["upscale", "a.png", "-o", "--json"], "--output", "--json"),
                              (["upscale", "a.png", "-o", "out.png", "--model", "--debug"], "--model", "--debug"),
                              (["upscale", "a.png", "-o", "out.png", "--lora", "-q"], "--lora", "-q"),
                              (["eval", "a.png", "--ref", "--json"], "--ref", "--json"),
                              (["weights", "download", "--dtype", "--help"], "--dtype", "--help")):
        result = CliRunner().invoke(app, [*args, "--base", tmp_path / "no-model"] if args[0] == "upscale" else args,
                                    env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
        assert result.exit_code == 2, (args, result.output)
        assert f"Invalid value for {flag}: none given; it took the next option, {taken}, for its value" in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    # a value that merely starts with a dash is still a value
    result = CliRunner().invoke(app, ["upscale", "a.png", "-o", "out.png", "--prompt", "-a sunset", "--base", tmp_path / "no-model"])
    assert result.exit_code == 2 and "--base" in result.stderr and "none given" not in result.stderr, result.output


def test_control_characters_in_names_print_as_escapes(tmp_path):
    """A file name holding a newline split its error in two lines of a log, and one holding ESC
    sequences reached the terminal raw (recolouring it, or worse). Messages show them escaped, as
    ls does, and a byte that is not UTF-8 as that byte; --json keeps the name exact, for scripts to
    find the file."""
    names = ["new\nline.png", "esc\x1b[2Jcleared.png", "c1\x9bcsi.png", os.fsdecode(b"caf\xe9.png")]  # the last not UTF-8
    for name in names:
        (tmp_path / name).write_bytes(b"not an image")
    result = run("upscale", *(tmp_path / n for n in names), "-o", tmp_path / "out", "--base", tmp_path / "no-model")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/new\\nline.png: cannot read image (not a recognised image format)",
        f"error: {tmp_path}/esc\\x1b[2Jcleared.png: cannot read image (not a recognised image format)",
        f"error: {tmp_path}/c1\\x9bcsi.png: cannot read image (not a recognised image format)",
        f"error: {tmp_path}/caf\\xe9.png: cannot read image (not a recognised image format)",  # it printed caf\udce9.png
        "0 done, 0 skipped, 4 failed",
    ]
    result = run("upscale", *(tmp_path / n for n in names), "-o", tmp_path / "out", "--base", tmp_path / "no-model", "--json")
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [str(tmp_path / n) for n in names]


@pytest.mark.parametrize("given, suffix", [("jpeg", ".jpeg"), ("tif", ".tif"), (".PNG", ".png"), ("JPG", ".jpg")])
def test_format_takes_every_spelling_of_its_suffixes(tmp_path, given, suffix):
    """Inputs may be .jpeg or .tif, and --format jpeg or tif was a usage error."""
    src = tmp_path / "a.png"
    Image.fromarray(photo_like(8, 8)).save(src)
    result = run("upscale", src, "-o", f"{tmp_path / 'out'}/", "--format", given, "--base", tmp_path / "nowhere")
    assert result.exit_code == 2 and "--base" in result.stderr and "--format" not in result.stderr  # on to the model
    from icmsr_cli.io import batch

    jobs, _ = batch.plan([str(src)], str(tmp_path / "out") + "/", fmt=given.lower().removeprefix("."))
    assert [j.target for j in jobs] == [tmp_path / "out" / f"a{suffix}"]


def test_a_log_hears_how_far_a_long_image_has_come(tmp_path, tiny_base, tiny_lora, monkeypatch):
    """Off a terminal no bars are drawn, and a 6000x4000 output on a CPU (13 minutes) left nothing
    in a log until its file was written. A line now says each stage's tiles at most every 30 s
    (here every time), naming the image, and -q keeps the log to errors."""
    from icmsr_cli import cli

    monkeypatch.setattr(cli, "_LOG_EVERY", 0.0, raising=False)
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(40, 24)).save(src)
    Image.fromarray(photo_like(40, 24)).save(tmp_path / "out.png")  # with nothing to do, nothing is said either
    assert run("upscale", src, "-o", tmp_path / "out.png").exit_code == 0
    args = ["upscale", src, "-o", tmp_path / "out.png", "-s", "2", "--base", tiny_base, "--lora", tiny_lora, "--overwrite"]
    whole = run(*args, "--tile", "off")
    assert whole.exit_code == 0, whole.output
    progress = [line for line in whole.stderr.splitlines() if line.startswith("  ")]
    # each line names its image: in a batch they come between the line of the file before and this one's
    assert progress == [f"  {src}: {stage} {state}" for stage in ("encode", "unet", "decode") for state in ("running", "done")]
    tiled = run(*args, "--tile", "48")
    assert tiled.exit_code == 0, tiled.output
    assert f"  {src}: decode tiles 1/" in tiled.stderr
    assert not any(line.startswith("  ") for line in run(*args, "-q").stderr.splitlines())


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf", "four", "x", "4xx"])
def test_a_scale_that_is_not_a_positive_finite_number_is_a_usage_error(tmp_path, scale):
    """-s inf passed the CLI's check and failed deep inside as "a bug in icmsr" (exit 3)."""
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(8, 8)).save(src)
    result = run("upscale", src, "-o", tmp_path / "out.png", "-s", scale)
    assert result.exit_code == 2, result.output
    assert "--scale" in result.output and "positive finite" in result.output and "bug" not in result.output
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("tile", ["3", "big", "-64"])
def test_a_bad_tile_names_the_option(tmp_path, tile):
    """"Invalid value: '3'" named no option; every other usage error names its flag."""
    result = run("upscale", tmp_path / "in.png", "-o", tmp_path / "out.png", "--tile", tile)
    assert result.exit_code == 2 and "Invalid value for --tile" in result.output, result.output


def test_image_bytes_are_not_written_to_a_terminal(tmp_path):
    """-o - with stdout on a terminal is refused before any work (it dumped the encoded image there)."""
    import os
    import pty
    import subprocess
    import sys

    src = tmp_path / "in.png"
    Image.fromarray(photo_like(8, 8)).save(src)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "icmsr_cli", "upscale", str(src), "-o", "-"], stdout=terminal,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120, env={**os.environ, "COLUMNS": "200"})
        os.close(terminal)
        terminal = None
        written = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            written += chunk
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)
    assert proc.returncode == 2, proc.stderr.decode()
    assert b"standard output is a terminal" in proc.stderr and not written, (proc.stderr, written[:100])


def test_standard_input_on_a_terminal_is_refused(tmp_path):
    """`icmsr upscale - -o x.png` typed without a pipe loaded the model, then waited in silence for
    image bytes from the keyboard."""
    import os
    import pty
    import subprocess
    import sys

    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "icmsr_cli", "upscale", "-", "-o", str(tmp_path / "o.png"), "--base", str(tmp_path),
                               "--lora", str(tmp_path / "x.pkl")],
                              stdin=terminal, capture_output=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == 2, proc.stderr.decode()
    assert b"standard input is a terminal" in proc.stderr


def test_an_image_its_reader_never_took_is_a_failure(tmp_path, tiny_base, tiny_lora):
    """`icmsr upscale x.png -o - | head -c 100`: the reader ended before the image was written, and
    the run said "x.png -> stdout" and exited 1 without a word about it (click's handling of a
    broken pipe). The file is named as failed, with why, and no traceback follows at exit."""
    import os
    import subprocess
    import sys

    src = tmp_path / "in.png"
    Image.fromarray(photo_like(16, 16)).save(src)
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has already gone
    try:
        proc = subprocess.run([sys.executable, "-m", "icmsr_cli", "upscale", str(src), "-o", "-", "--base", str(tiny_base),
                               "--lora", str(tiny_lora)], stdout=write_end, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=300, env={**os.environ, "COLUMNS": "300"})
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert f"error: {src}: standard output was closed before the whole image was written" in err, err
    assert "-> stdout" not in err and "Traceback" not in err and "Exception ignored" not in err, err
