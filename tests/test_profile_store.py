"""Profile files on the --cache-dir volume (warmgate.profilestore): keyed by the model and
the served arguments, one file per pod, written atomically, merged at a start."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from warmgate.profile import Combo, Profile
from warmgate.profilestore import (
    PROFILES_DIR,
    ProfileStore,
    keys_in,
    pod_name,
    profile_key,
    read_file,
)

VLLM = ["vllm", "serve", "org/Tiny-Llama", "--max-model-len", "2048"]


def counted(key: str, pod: str, n: int) -> Profile:
    p = Profile(key, pods=(pod,))
    p.count(Combo("chat", True, "greedy", (("temperature", 0.0),)), 10.0, n)
    return p


def test_the_key_is_the_model_and_served_args_not_where_it_listens_or_the_image() -> None:
    key = profile_key(VLLM)
    assert key.startswith("Tiny-Llama-")
    same = [*VLLM, "--port", "9000", "--enable-log-requests", "--api-key=s3cret"]
    assert profile_key(same) == key  # (the cache key's --cache-key and GPU are not inputs)
    assert profile_key([*VLLM, "--max-num-seqs", "8"]) != key
    assert profile_key(["vllm", "serve", "m", "--served-model-name", "chat-v2"]).startswith(
        "chat-v2-"
    )
    assert pod_name({"HOSTNAME": "web-7f9c/../x"}) == "web-7f9c_.._x"


def test_each_pod_writes_its_own_file_and_a_start_merges_them(tmp_path: Path) -> None:
    key = profile_key(VLLM)
    a, b = ProfileStore(tmp_path, key, "pod-a"), ProfileStore(tmp_path, key, "pod-b")
    assert a.write(counted(key, "pod-a", 3)) is None
    assert b.write(counted(key, "pod-b", 4)) is None
    assert sorted(p.name for p in a.folder.iterdir()) == ["pod-a.json", "pod-b.json"]
    merged, warnings = a.read_all()
    assert merged is not None and warnings == []
    assert merged.requests == 7 and set(merged.pods) == {"pod-a", "pod-b"}
    assert keys_in(tmp_path) == [key]
    own, _ = a.read_own()
    assert own is not None and own.requests == 3


def test_a_rewrite_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, "k", "pod")
    store.write(counted("k", "pod", 1))
    inode = store.own.stat().st_ino
    store.write(counted("k", "pod", 2))
    assert store.own.stat().st_ino != inode  # renamed over, never written in place
    assert [p.name for p in store.folder.iterdir()] == ["pod.json"]
    assert read_file(store.own).requests == 2


def test_a_broken_file_is_left_out_with_a_warning_naming_it(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, "k", "pod-a")
    store.write(counted("k", "pod-a", 5))
    (store.folder / "pod-b.json").write_text("{not json")
    (store.folder / "pod-c.json").write_text(json.dumps({"format": "other"}))
    merged, warnings = store.read_all()
    assert merged is not None and merged.requests == 5
    assert len(warnings) == 2 and all("left out of the merge" in w for w in warnings)
    assert any("pod-b.json: not JSON" in w for w in warnings)
    broken = ProfileStore(tmp_path, "k", "pod-b")
    found, warning = broken.read_own()
    assert found is None and warning is not None and "starts a new profile" in warning


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_a_read_only_volume_is_a_warning_not_an_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        warning = ProfileStore(tmp_path, "k", "pod").write(counted("k", "pod", 1))
    finally:
        tmp_path.chmod(0o700)
    assert warning is not None and "not written" in warning


def test_a_volume_that_is_a_file_is_a_warning_not_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    warning = ProfileStore(blocker, "k", "pod").write(counted("k", "pod", 1))
    assert warning is not None and "not written" in warning
    assert ProfileStore(blocker, "k", "pod").read_all() == (None, [])
    assert keys_in(tmp_path / "nothing") == [] and not (tmp_path / PROFILES_DIR).exists()
