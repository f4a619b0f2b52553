"""files.py: the one check that keeps outputs off inputs, and staging folders a killed write left."""

from __future__ import annotations

import os

import pytest

from sara_cli.errors import SaraError
from sara_cli.files import atomic_dir, check_apart, remove_stale_staging

DEAD_PID = 4_194_399  # above Linux's largest pid_max: no process has it


@pytest.fixture
def tree(tmp_path):
    """base/ (a model folder with a weight file), data.json, and an unrelated out/."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"w")
    (tmp_path / "data.json").write_text("[]")
    return tmp_path


@pytest.mark.parametrize("output, relation", [
    ("base", "is"),                           # the folder itself
    ("base/model.safetensors", "is"),         # a file inside it, named as the input
    (".", "contains"),                        # a parent of the input
    ("base/merged", "lies inside"),           # a folder inside the input
])
def test_an_output_on_an_input_is_refused_naming_both(tree, output, relation):
    inputs = [("the base model", tree / "base")]
    if output.endswith(".safetensors"):
        inputs = [("the weights", tree / "base" / "model.safetensors")]
    with pytest.raises(SaraError) as caught:
        check_apart([("--out", tree / output)], inputs, "merge")
    message = str(caught.value)
    assert f"--out {tree / output} {relation} " in message and str(inputs[0][1]) in message
    assert "merge reads" in message


def test_links_and_hard_links_are_seen_through(tree):
    (tree / "link").symlink_to(tree / "base", target_is_directory=True)
    os.link(tree / "data.json", tree / "alias.json")
    with pytest.raises(SaraError, match="is the base model"):
        check_apart([("--out", tree / "link")], [("the base model", tree / "base")], "merge")
    with pytest.raises(SaraError, match="is the data file"):
        check_apart([("--json", tree / "alias.json")], [("the data file", tree / "data.json")], "eval")


def test_separate_paths_and_missing_ones_pass(tree):
    check_apart([("--out", tree / "out"), ("--json", None)],
                [("the base model", tree / "base"), ("the data file", tree / "data.json"), ("x", None)], "eval")
    check_apart([("--out", tree / "base-merged")], [("the base model", tree / "base")], "merge")  # a prefix


def test_a_killed_writes_staging_is_removed_and_a_live_ones_kept(tree):
    target = tree / "merged"
    dead = tree / f".merged.{DEAD_PID}.abc.partial"
    older = tree / ".merged.k2j_x9.partial"  # an older sara's name, without a PID
    live = tree / f".merged.{os.getppid()}.abc.partial"
    replaced = tree / f".merged.old-{DEAD_PID}"
    other = tree / f".model.{DEAD_PID}.abc.partial"  # another target's
    for folder in (dead, older, live, replaced, other):
        folder.mkdir()
    assert sorted(remove_stale_staging(target)) == sorted([dead, older, replaced])
    assert live.is_dir() and other.is_dir()


def test_atomic_dir_cleans_up_before_it_writes(tree):
    stale = tree / f".merged.{DEAD_PID}.abc.partial"
    stale.mkdir()
    with atomic_dir(tree / "merged") as staging:
        (staging / "x").write_text("new")
    assert not stale.exists() and (tree / "merged" / "x").read_text() == "new"
    assert [p.name for p in tree.iterdir() if p.name.startswith(".merged")] == []


def test_a_full_disk_is_named_by_the_final_path_and_leaves_no_temporary_file(tmp_path):
    from sara_cli.files import NoSpace, atomic_path

    with pytest.raises(NoSpace, match=f"no space left on the device while writing {tmp_path / 'r.json'}: free"):
        with atomic_path(tmp_path / "r.json") as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_library_messages_of_a_full_disk_are_recognised_and_others_are_not(tmp_path):
    from sara_cli.files import no_space

    safetensors = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "while writing" in str(no_space(safetensors, tmp_path))
    assert no_space(OSError(13, "Permission denied")) is None
    # torch.save's stream error alone says nothing: with plenty of room it is some other failure.
    assert no_space(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5 vs 3"), tmp_path) is None


def test_an_unwritable_folder_is_named_with_the_path_the_user_gave(tmp_path, monkeypatch):
    """(As root every folder is writable, so the refusal is simulated through os.access.)"""
    from sara_cli.files import check_output_file, check_writable

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(SaraError, match=f"cannot write --json {tmp_path / 'k.json'}: its folder {tmp_path} is not writable"):
        check_output_file(tmp_path / "k.json", "--json")
    with pytest.raises(SaraError, match=f"cannot write --out {tmp_path / 'merged'}: its folder {tmp_path} is not"):
        check_writable(tmp_path, "--out", given=tmp_path / "merged")
