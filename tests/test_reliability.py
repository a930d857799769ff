"""Reliability on the line (issue 30, part B): metadata sealed by its digest, exports that leave nothing behind
when killed (SIGKILL at 5 points, SIGTERM, SIGINT) and sweep what a killed one left, world-readable bundles,
full-disk and permission errors as one line, and `export --int8 --data` calibrating on --data."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ov = pytest.importorskip("openvino")

from cli import main  # noqa: E402
from conftest import tiny_recipe_dict  # noqa: E402
from ssn_edge.runtime.bundle import METADATA_DIGEST, BundleError, load_bundle, metadata_digest, write_bundle  # noqa: E402
from test_runtime import tiny_bundle  # noqa: E402,F401  (the fixture: a hand-built fp32/fp16/int8 bundle)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _copy(bundle: Path, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(bundle, out)
    return out


def _meta(bundle: Path) -> dict:
    return json.loads((bundle / "metadata.json").read_text())


def _one_clear_line(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------------------
# metadata.json is covered by its digest
# --------------------------------------------------------------------------------------------------------------


def test_a_one_digit_threshold_edit_is_refused_at_load_by_every_command(tiny_bundle, tmp_path):  # noqa: F811
    edited = _copy(tiny_bundle, tmp_path)
    text = (edited / "metadata.json").read_text()
    assert '"image": 0.6,' in text
    (edited / "metadata.json").write_text(text.replace('"image": 0.6,', '"image": 0.9,', 1))  # one digit
    with pytest.raises(BundleError, match="the metadata was edited after export") as exc:
        load_bundle(edited)
    assert str(exc.value).startswith(str(edited / "metadata.json")) and "\n" not in str(exc.value)
    image = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    for argv in (["predict", str(edited), str(image), "--out", str(tmp_path / "p"), "--precision", "fp32"],
                 ["bench", str(edited), "--runs", "1", "--warmup", "0", "--seconds", "0"],
                 ["report", str(edited), "--runs", "1"]):
        _one_clear_line(CliRunner().invoke(main, argv), str(edited), "metadata was edited")
    assert not (tmp_path / "p" / "predictions.json").exists()


def test_the_digest_is_of_the_canonical_form_so_reformatting_is_not_an_edit(tiny_bundle, tmp_path):  # noqa: F811
    meta = _meta(tiny_bundle)
    assert meta[METADATA_DIGEST] == metadata_digest(meta)
    copy = _copy(tiny_bundle, tmp_path)
    reordered = dict(reversed(list(meta.items())))
    (copy / "metadata.json").write_text(json.dumps(reordered, indent=7, sort_keys=True))
    assert load_bundle(copy).sealed
    for key, value in (("thresholds", {**meta["thresholds"], "pixel": 0.5000001}), ("files", {}), ("extra", 1)):
        (copy / "metadata.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(BundleError) as exc:
            load_bundle(copy)
        assert str(copy / "metadata.json") in str(exc.value)
    (copy / "metadata.json").write_text(json.dumps({**meta, METADATA_DIGEST: "00" * 31}))
    with pytest.raises(BundleError, match="field 'metadata_sha256' is '0000.*expected a sha256 hex digest"):
        load_bundle(copy)


def test_a_bad_field_is_named_before_the_digest_is_checked(tiny_bundle, tmp_path):  # noqa: F811
    copy = _copy(tiny_bundle, tmp_path)
    meta = _meta(copy)
    meta["thresholds"]["image"] = None
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="field 'thresholds.image' is null, expected a number"):
        load_bundle(copy)


def test_a_v2_bundle_written_before_the_digest_loads_with_one_warning(tiny_bundle, tmp_path, caplog):  # noqa: F811
    copy = _copy(tiny_bundle, tmp_path)
    meta = _meta(copy)
    meta.pop(METADATA_DIGEST)
    (copy / "metadata.json").write_text(json.dumps(meta, indent=2))
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        first, second = load_bundle(copy), load_bundle(copy)
    assert not first.sealed and first.metadata == second.metadata == load_bundle(tiny_bundle).metadata
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(copy / "metadata.json") in warnings[0] and "re-export" in warnings[0]
    assert "\n" not in warnings[0]


def test_a_v1_bundle_is_migrated_with_a_warning(tiny_bundle, tmp_path, caplog):  # noqa: F811
    from ssn_edge.runtime.bundle import sha256_file

    v1 = tmp_path / "v1"
    meta = json.loads((FIXTURES / "v1_plain_metadata.json").read_text())
    v1.mkdir()
    for name in meta["files"]:
        src = tiny_bundle / name if (tiny_bundle / name).exists() else None
        (v1 / name).write_bytes(src.read_bytes() if src else b"{}")
        meta["files"][name] = sha256_file(v1 / name)
    (v1 / "metadata.json").write_text(json.dumps(meta, indent=2))
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        bundle = load_bundle(v1)
    assert bundle.schema_version == 1 and not bundle.sealed
    assert any("schema v1" in r.getMessage() and "no checksum" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------------
# Permissions, full disk, read-only folders
# --------------------------------------------------------------------------------------------------------------


def _modes(root: Path) -> set[tuple[str, int]]:
    out = {("dir", root.stat().st_mode & 0o777)}
    for p in root.rglob("*"):
        out.add(("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777))
    return out


def _rebuild(bundle: Path, out: Path, **kw) -> Path:
    """The bundle's files written again by write_bundle (as export does)."""
    b = load_bundle(bundle)
    files = {name: bundle / name for name in b.metadata.files}
    write_bundle(out, b.metadata, files, **kw)
    return out


def test_bundle_folders_are_0755_and_files_0644_narrowed_by_the_umask(tiny_bundle, tmp_path):  # noqa: F811
    old = os.umask(0o022)
    try:
        assert _modes(_rebuild(tiny_bundle, tmp_path / "a")) == {("dir", 0o755), ("file", 0o644)}
        os.umask(0o002)  # a wider umask does not make a bundle group-writable
        assert _modes(_rebuild(tiny_bundle, tmp_path / "b")) == {("dir", 0o755), ("file", 0o644)}
        os.umask(0o027)  # the user asked for less
        assert _modes(_rebuild(tiny_bundle, tmp_path / "c")) == {("dir", 0o750), ("file", 0o640)}
    finally:
        os.umask(old)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or p.name.endswith(".old")
                  or p.name.startswith("ssn-edge-export-"))


def test_a_full_disk_while_writing_a_bundle_is_one_line_and_leaves_nothing(tiny_bundle, tmp_path, monkeypatch):  # noqa: F811
    import ssn_edge.runtime.bundle as bundle_mod

    calls = []

    def full(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return shutil.copyfile(src, dst)

    monkeypatch.setattr(bundle_mod.shutil, "copyfile", full)
    with pytest.raises(BundleError) as exc:
        _rebuild(tiny_bundle, tmp_path / "out")
    msg = str(exc.value)
    assert msg.startswith(str(tmp_path / "out")) and "no space left on device" in msg and "nothing was written" in msg
    assert "\n" not in msg and "Errno" not in msg
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_full_disk_during_an_export_is_one_line_without_traceback(tiny_checkpoint, tmp_path, monkeypatch):
    import ssn_edge.export.exporter as ex

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/ssn-edge-export-x/model_fp32.bin")

    monkeypatch.setattr(ex, "predict_arrays", full)  # right after the FP32 model is saved to the temporary folder
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)])
    line = _one_clear_line(result, str(out), "no space left on device", "TMPDIR")
    assert "nothing was written" in line
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_full_disk_during_predict_keeps_no_half_written_results(tiny_bundle, tmp_path, monkeypatch):  # noqa: F811
    import cv2

    import ssn_edge.runtime.results as results

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        cv2.imwrite(str(images / f"{i}.png"), np.full((64, 64, 3), 40 * i, np.uint8))
    real, seen = results.ResultWriter.add, []

    def add(self, record):
        seen.append(record)
        if len(seen) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.jsonl_partial))
        return real(self, record)

    monkeypatch.setattr(results.ResultWriter, "add", add)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(tiny_bundle), str(images), "--out", str(out), "--precision", "fp32"])
    _one_clear_line(result, str(out), "cannot write the results: no space left on device", "predictions.jsonl.partial")
    assert sorted(p.name for p in out.iterdir()) == []  # neither the summary nor half a JSONL/CSV


def _without_dac_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so even
    root is held to folder permissions (root owns the read-only folder: its owner bits r-x apply)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _unprivileged(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a child that folder permissions apply to (as root: without the capabilities that bypass them)."""
    env = {**os.environ, "SSN_EDGE_DEBUG": ""}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *argv], cwd=cwd, capture_output=True, text=True,
                          env=env, preexec_fn=_without_dac_override if os.geteuid() == 0 else None, timeout=300)


def _read_only(folder: Path) -> Path:
    folder.mkdir()
    os.chmod(folder, 0o555)
    if subprocess.run(["sh", "-c", f"touch '{folder}/probe'"], capture_output=True,
                      preexec_fn=_without_dac_override if os.geteuid() == 0 else None).returncode == 0:
        os.unlink(folder / "probe")
        pytest.skip("this machine lets the test process write into a 0555 folder (no way to drop the override)")
    return folder


def test_predict_into_a_read_only_folder_is_one_line(tiny_bundle, tmp_path):  # noqa: F811
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.full((64, 64, 3), 90, np.uint8))
    locked = _read_only(tmp_path / "locked")
    proc = _unprivileged(["predict", str(tiny_bundle), str(tmp_path / "a.png"), "--out", str(locked / "out"),
                          "--precision", "fp32"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(locked / "out") in errors[0] and "permission denied" in errors[0], proc.stderr
    assert not (locked / "out").exists()


def test_export_into_a_read_only_folder_is_one_line(tiny_checkpoint, tmp_path):
    locked = _read_only(tmp_path / "locked")
    proc = _unprivileged(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(locked / "bundle")], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot write the bundle: permission denied" in errors[0], proc.stderr
    assert str(locked / "bundle") in errors[0] and "nothing was written" in errors[0]
    assert list(locked.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# Killed exports: nothing at --out, and nothing left once the next export has run
# --------------------------------------------------------------------------------------------------------------

# Each point patches one step of the export in a child process to signal it right there (SIGKILL unless
# KILL_SIGNAL names another).
_KILL_DRIVER = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import ssn_edge.export.exporter as ex, ssn_edge.runtime.bundle as bu

def die(*_a, **_k):
    os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))

def then_die(fn):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        die()
        return out
    return wrapped

point = os.environ["KILL_AT"]
if point == "converted":  # the temporary folder exists, the FP32 model is not saved yet
    ex.convert = then_die(ex.convert)
elif point == "fp32_saved":  # the FP32 IR is in the temporary folder
    ex.predict_arrays = then_die(ex.predict_arrays)
elif point == "metadata_built":  # every model saved, write_bundle not called yet
    ex._metadata = then_die(ex._metadata)
elif point == "copying":  # the staging folder beside --out holds the first file
    bu.sha256_file = then_die(bu.sha256_file)
elif point == "renaming":  # the staging folder is complete (metadata.json written), not renamed yet
    bu._move_into_place = die
from cli import main
main(sys.argv[1:])
"""

# --overwrite, killed between moving the old bundle aside and renaming the new one into place (torch-free: the
# step is write_bundle's, the same for every export).
_SWAP_DRIVER = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import ssn_edge.runtime.bundle as bu
real = os.replace
def replace(src, dst):
    real(src, dst)
    if str(dst).endswith(".old"):
        os.kill(os.getpid(), signal.SIGKILL)
bu.os.replace = replace
source = bu.load_bundle(sys.argv[1])
bu.write_bundle(sys.argv[2], source.metadata, {{n: source.path / n for n in source.metadata.files}}, overwrite=True)
"""

KILL_POINTS = ("converted", "fp32_saved", "metadata_built", "copying", "renaming")


@dataclass
class Killed:
    returncode: int
    pid: int
    stderr: str


def _killed_export(point: str, checkpoint: Path, out: Path, tmpdir: Path, *extra: str,
                   signum: signal.Signals = signal.SIGKILL) -> Killed:
    env = {**os.environ, "KILL_AT": point, "KILL_SIGNAL": signum.name, "TMPDIR": str(tmpdir), "SSN_EDGE_DEBUG": ""}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_DRIVER.format(root=str(ROOT)), "export", "--checkpoint",
                             str(checkpoint), "--out", str(out), *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    return Killed(proc.returncode, proc.pid, err)


def test_sigkill_at_five_points_leaves_no_bundle_and_the_next_export_sweeps_the_rest(tiny_checkpoint, tmp_path,
                                                                                      monkeypatch):
    from ssn_edge.export.exporter import export_bundle

    tmpdir, site = tmp_path / "tmp", tmp_path / "site"
    tmpdir.mkdir(), site.mkdir()
    out = site / "bundle"
    for point in KILL_POINTS:
        proc = _killed_export(point, tiny_checkpoint, out, tmpdir)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        assert not out.exists(), point  # never a partial bundle at --out
        # what this kill left (a temporary folder; a staging folder beside --out once write_bundle had begun);
        # what the kill before left is gone: this export swept it when it started
        temp, staged = _leftovers(tmpdir), _leftovers(site)
        assert temp == [f"ssn-edge-export-{proc.pid}-" + temp[0].rsplit("-", 1)[1]], (point, temp)
        assert staged == ([f".bundle.{proc.pid}." + staged[0].split(".")[3] + ".partial"]
                          if point in ("copying", "renaming") else []), (point, staged)
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    export_bundle(tiny_checkpoint, out)  # the next export sweeps what the last kill left
    assert _leftovers(tmpdir) == [] and _leftovers(site) == [] and load_bundle(out).sealed


def test_a_kill_mid_overwrite_puts_the_old_bundle_back_at_the_next_export(tiny_bundle, tmp_path):  # noqa: F811
    from ssn_edge.runtime.bundle import sweep_partials

    out = _copy(tiny_bundle, tmp_path, "line_bundle")
    before = load_bundle(out).metadata
    proc = subprocess.run([sys.executable, "-c", _SWAP_DRIVER.format(root=str(ROOT)), str(tiny_bundle), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists() and len(_leftovers(tmp_path)) == 2  # the moved-aside bundle and the new one, staged
    sweep_partials(tmp_path / "another_bundle")  # what an export to any --out in this folder does first
    assert _leftovers(tmp_path) == [] and load_bundle(out).metadata == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_remove_the_temporary_folders_and_exit_128_plus_the_signal(tiny_checkpoint, tmp_path,
                                                                                        signum):
    # In a child process, as a user's export gets it: a signal sent to the test process itself arrives on whichever
    # of OpenVINO's and torch's threads the kernel picks, and once crashed the whole suite (exit 139 in CI).
    tmpdir, site = tmp_path / "tmp", tmp_path / "site"
    tmpdir.mkdir(), site.mkdir()
    out = site / "bundle"
    proc = _killed_export("copying", tiny_checkpoint, out, tmpdir, signum=signum)  # staging folder being filled
    assert proc.returncode == 128 + signum, (proc.returncode, proc.stderr[-2000:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: export to {out} interrupted by {signum.name}; nothing was written"], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    assert _leftovers(tmpdir) == [] and _leftovers(site) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_raise_gives_the_handlers_back_and_ignores_a_second_signal(signum):
    from ssn_edge.runtime.atomic import Interrupted, signals_raise

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Interrupted) as caught, signals_raise("export to X"):
        signal.getsignal(signum)(signum, None)  # the installed handler, called as the interpreter would
    assert caught.value.signum == signum
    assert str(caught.value) == f"export to X interrupted by {signum.name}; nothing was written"
    assert {s: signal.getsignal(s) for s in before} == before
    with signals_raise("y"):
        with pytest.raises(Interrupted):
            signal.getsignal(signum)(signum, None)
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # clean-up


def test_a_legacy_leftover_is_swept_only_once_it_is_an_hour_old(tmp_path):
    from ssn_edge.runtime.bundle import sweep_partials

    fresh, old = tmp_path / ".bundle.abcd1234.partial", tmp_path / ".bundle.zz99yy88.partial"
    alive = tmp_path / f".bundle.{os.getppid()}.abcdefgh.partial"  # its process runs
    for d in (fresh, old, alive):
        d.mkdir()
    os.utime(old, (0, 0))
    assert sweep_partials(tmp_path / "bundle") == [old]
    assert fresh.exists() and alive.exists()


# --------------------------------------------------------------------------------------------------------------
# export --int8 --data X from another folder
# --------------------------------------------------------------------------------------------------------------


def test_export_int8_from_another_folder_calibrates_on_data(tiny_dataset, tmp_path, monkeypatch):
    from ssn_edge.config import recipe_from_dict
    from ssn_edge.train.job import train_job

    work = tmp_path / "training"
    shutil.copytree(tiny_dataset, work / "data")
    monkeypatch.chdir(work)
    recipe = tiny_recipe_dict(Path("data"))  # relative, as recipes say it: meaningless from anywhere else
    checkpoint = train_job(recipe_from_dict(recipe), work / "run", progress=False).checkpoint
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = elsewhere / "bundle"
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--int8",
                                       "--calibration-size", "4", "--data", str(work / "data")])
    assert result.exit_code == 0, result.output
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["spec"]["path"] == str(work / "data") and calib["count"] == 4
    assert all((work / "data" / i["path"]).is_file() for i in calib["images"])
    assert re.search(r"/train/", "/".join(i["path"] for i in calib["images"]))


# --------------------------------------------------------------------------------------------------------------
# One list of image names for datasets, calibration folders and predict
# --------------------------------------------------------------------------------------------------------------


def test_datasets_calibration_and_predict_take_the_same_image_names(tmp_path):
    import ssn_edge.data.samples as samples
    from ssn_edge.runtime.inputs import IMAGE_EXTENSIONS, collect_inputs

    assert not hasattr(samples, "IMAGE_SUFFIXES") and samples.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    for ext in (*IMAGE_EXTENSIONS, ".PNG", ".Jpg", ".txt", ".db", ".npy"):
        (tmp_path / f"f{ext}").write_bytes(b"x")
    by_dataset = [p.name for p in samples._image_files(tmp_path)]
    by_predict = sorted(Path(i.path).name for i in collect_inputs([tmp_path]).items)
    assert sorted(by_dataset) == by_predict and len(by_predict) == len(IMAGE_EXTENSIONS) + 2
    assert not any(n.endswith((".txt", ".db", ".npy")) for n in by_predict)
