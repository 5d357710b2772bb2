"""torchrun restarts: two "nodes" on loopback, a worker killed by kill -9 after the first checkpoint, the group
resumes by itself and ends with the weights of an uninterrupted run; what a restart decides; the refusals (the
shared rendezvous store that would hang, a run folder a node cannot see)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from isif.base.dist import check_restartable
from isif.base.errors import UserError
from isif.training.elastic import decide

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # its launch helpers are its own
try:
    from elastic_restart import same_weights, two_nodes
finally:
    sys.path.pop(0)

OUT = Path("/runs/x")


@pytest.mark.parametrize("facts, action, phrase", [
    ((False, [False, False], False, True), "as-asked", ""),  # a first start: --resume / --overwrite as always
    ((True, [True, True], True, True), "resume", ""),
    ((True, [True, True], False, True), "refuse", "holds a checkpoint of another command"),
    ((True, [True, False], True, True), "refuse", "rank 1 cannot see the /runs/x/checkpoints/last.pt that rank 0"),
    ((True, [True, False, False], True, True), "refuse", "ranks 1, 2 cannot see"),
    ((True, [False, False], True, True), "start-again", ""),  # died before its first checkpoint
    ((True, [False, False], False, False), "start-again", ""),  # died before it made the folder
    ((True, [False, False], False, True), "as-asked", ""),  # another run's folder: refused as already existing
])
def test_what_a_restarted_group_does_with_what_each_process_sees(facts, action, phrase):
    got, why = decide(*facts, OUT)
    assert got == action and phrase in why and "\n" not in why


def test_a_shared_rendezvous_store_across_nodes_with_restarts_is_refused_before_it_can_hang(monkeypatch):
    env = {"GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError) as e:
        check_restartable()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in str(e.value) and "--max-restarts 1" in str(e.value)
    for k, v in (("TORCHELASTIC_USE_AGENT_STORE", "False"), ("GROUP_WORLD_SIZE", "1"),
                 ("TORCHELASTIC_MAX_RESTARTS", "0")):
        monkeypatch.setenv(k, v)
        check_restartable()  # not shared, one node, or no restarts: nothing can hang
        monkeypatch.setenv(k, env[k])


@pytest.mark.slow
def test_a_worker_killed_after_the_first_checkpoint_resumes_by_itself_to_the_uninterrupted_weights(tmp_path,
                                                                                                   image_tree):
    plain = two_nodes(image_tree, tmp_path / "plain", 6, False, timeout=300)
    assert plain["codes"] == [0, 0], plain["logs"][0][-3000:]
    hit = two_nodes(image_tree, tmp_path / "killed", 6, True, timeout=300)
    assert hit["killed"] is not None and hit["codes"] == [0, 0], hit["logs"][0][-3000:]
    logs = "".join(hit["logs"])
    assert "exitcode: -9" in logs and "isif: torchrun restarted the group (restart 1): resuming" in logs
    equal, n = same_weights(tmp_path / "plain" / "checkpoints" / "last.pt",
                            tmp_path / "killed" / "checkpoints" / "last.pt")
    assert equal and n > 50  # bit-exact on CPU, as the single-process resume
    assert (tmp_path / "killed" / "metrics.jsonl").read_text().count("\n") == 6


@pytest.mark.slow
def test_without_the_fix_for_the_shared_store_every_node_refuses_in_one_line(tmp_path, image_tree):
    r = two_nodes(image_tree, tmp_path / "r", 2, False, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}, timeout=300)
    assert r["codes"] == [1, 1]
    for log in r["logs"]:
        lines = [x for x in log.splitlines() if x.startswith("isif: error: ")]
        assert lines and "needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in lines[0]
        assert "Traceback" not in log.split("isif: error:")[0][-400:]


def _private_mount_works(where: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {where}"], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
def test_a_run_folder_another_node_cannot_see_is_refused_before_training(tmp_path, image_tree):
    """The second node in its own mount namespace with a private tmpfs over the run folder's parent: a disk that
    is not shared."""
    private = tmp_path / "private"
    private.mkdir()
    if not _private_mount_works(private):
        pytest.skip("unshare -m / mount (CAP_SYS_ADMIN) is not available here to give a node its own disk")
    wrap = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs {private} && exec "$@"', "sh"]
    r = two_nodes(image_tree, private / "run", 2, False, timeout=300, wrap=wrap)
    assert r["codes"] == [1, 1]
    for log in r["logs"]:
        line = next(x for x in log.splitlines() if x.startswith("isif: error: "))
        assert "rank 1 cannot see the run folder rank 0 writes" in line and "--max-restarts 0" in line
    assert not (private / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_embedding_across_nodes_refuses_an_embed_folder_a_node_cannot_see(tmp_path):
    """isif embed on two torchrun nodes, the second with a disk of its own: its shards would never reach rank 0's
    consolidation, so the images they hold would silently be missing; refused on both nodes first."""
    import os

    from elastic_restart import free_port

    from tests.conftest import train_tiny_run
    from tests.test_embed_scale import photos

    private = tmp_path / "private"
    private.mkdir()
    if not _private_mount_works(private):
        pytest.skip("unshare -m / mount (CAP_SYS_ADMIN) is not available here to give a node its own disk")
    run, _ = train_tiny_run(tmp_path / "t")
    folder = photos(tmp_path / "p", 6)
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"e{port}", "-m", "isif", "embed", str(run),
           str(folder), "--out", str(private / "emb"), "--quiet", "--workers", "0", "--device", "cpu"]
    wrap = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs {private} && exec "$@"', "sh"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(wrap * i + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    for log in logs:
        line = next(x for x in log.splitlines() if x.startswith("isif: error: "))
        assert "rank 1 cannot see the embed folder rank 0 consolidates" in line
    assert not (private / "emb" / "index.json").exists()
