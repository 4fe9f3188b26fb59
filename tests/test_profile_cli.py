"""`warmgate profile show|export|import`, run as the real command: what a platform engineer
reads, commits and seeds a new cluster with; bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wgutil import events, run

from warmgate import plan
from warmgate.profile import Combo, Profile
from warmgate.profilestore import ProfileStore

KEY = "Tiny-Llama-0123456789ab"


def seed(cache_dir: Path, key: str = KEY, pods: tuple[str, ...] = ("pod-a", "pod-b")) -> None:
    for i, pod in enumerate(pods, 1):
        p = Profile(key, pods=(pod,))
        p.count(Combo("chat", True, "sampling+json", (("temperature", 0.7),)), 1000.0, 10 * i)
        p.count(Combo("completions", False, "greedy", (("temperature", 0.0),)), 1000.0, i)
        p.prompt_tokens = {256: 5.0 * i}
        p.updated = 2000.0
        assert ProfileStore(cache_dir, key, pod).write(p) is None


def one_error(stderr: str) -> str:
    (record,) = [e for e in events(stderr) if e.get("event") == "exit"]
    assert record["code"] == 2 and "Traceback" not in stderr
    return str(record["error"])


def test_show_merges_the_pods_most_frequent_first(tmp_path: Path) -> None:
    seed(tmp_path)
    code, out, err = run(["profile", "show", "--cache-dir", str(tmp_path)])
    assert code == 0, err
    assert f"profile {KEY}: 33 requests, 2 combinations, pods pod-a, pod-b" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert "chat/stream/sampling+json" in rows[0] and "91%" in rows[0]
    assert "256: 100%" in out
    code, out, err = run(["profile", "show", "--json"], env={"WARMGATE_CACHE_DIR": str(tmp_path)})
    assert code == 0, err
    data = json.loads(out)
    assert data["requests"] == 33 and data["combos"][0]["count"] == 30


def test_export_writes_a_plan_file_that_plan_accepts(tmp_path: Path) -> None:
    seed(tmp_path)
    target = tmp_path / "learned.toml"
    code, _, err = run(["profile", "export", "--cache-dir", str(tmp_path), "-o", str(target)])
    assert code == 0, err
    spec = plan.parse_plan_file(target.read_text(), source=str(target))
    assert spec.mode == "extend"
    assert (spec.shapes[0].endpoint, spec.shapes[0].stream) == ("chat", True)
    assert spec.shapes[0].feature == "sampling+json"
    assert spec.shapes[0].prompt_tokens == 192  # three quarters up the 256 octave
    info = plan.UpstreamInfo((plan.ModelInfo("m", 2048),), has_tokenize=True)
    built = plan.build_plan(plan.PlanSettings(plan_file=spec), info)
    assert any(s.family.startswith("file/chat/stream/sampling+json/") for s in built.shapes)


def test_import_seeds_another_volume_and_merges_twice(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    seed(old)
    new.mkdir()
    code, out, err = run(["profile", "show", "--json", "--cache-dir", str(old)])
    exported = tmp_path / "fleet.json"
    exported.write_text(out)
    for _ in range(2):
        code, out, err = run(["profile", "import", str(exported), "--cache-dir", str(new)])
        assert code == 0, err
    assert (new / "profiles" / KEY / "imported.json").is_file()
    code, out, _ = run(["profile", "show", "--json", "--cache-dir", str(new)])
    assert json.loads(out)["requests"] == 66
    code, _, err = run(
        ["profile", "import", str(exported), "--cache-dir", str(new), "--key", "other-key"]
    )
    assert code == 0, err
    assert (new / "profiles" / "other-key" / "imported.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "--cache-dir", "{missing}"], "no such directory"),
        (["show", "--cache-dir", "{empty}"], "holds no traffic profile yet"),
        (["export", "--cache-dir", "{two}"], "several profiles; pick one with --key"),
        (["show", "--cache-dir", "{two}", "--key", "nope"], "--key nope: no profile under"),
        (["show", "--cache-dir", "{garbage}"], "not JSON"),
        (["import", "{missing}/x.json", "--cache-dir", "{empty}"], "No such file"),
        (["import", "{garbage_file}", "--cache-dir", "{empty}"], "not JSON"),
        (["import", "{other_file}", "--cache-dir", "{empty}"], "not a warmgate profile"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    places = {name: tmp_path / name for name in ("missing", "empty", "two", "garbage")}
    places["empty"].mkdir()
    seed(places["two"])
    seed(places["two"], key="another-key")
    broken = places["garbage"] / "profiles" / KEY
    broken.mkdir(parents=True)
    (broken / "pod.json").write_text("{")
    places["garbage_file"] = broken / "pod.json"
    places["other_file"] = tmp_path / "other.json"
    places["other_file"].write_text("{}")
    argv = ["profile", *(a.format(**places) for a in args)]
    code, out, err = run(argv)
    assert code == 2 and out == ""
    assert message in one_error(err)
