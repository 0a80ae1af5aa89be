"""The coordinator's GPU placement reaches the process: ``CUDA_VISIBLE_DEVICES`` and the
``{gpu_memory_utilization}`` placeholder (vLLM's ``--gpu-memory-utilization``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rma.agent.runtimes.base import expand, free_port
from rma.agent.runtimes.process import ProcessRuntime
from rma.schemas.api import ServiceSpec

from .conftest import wait_for

WRITE = (
    "import json, os, sys, time;"
    "open(sys.argv[2], 'w').write(json.dumps({'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'),"
    " 'share': sys.argv[1]}));"
    "time.sleep(300)"
)


async def test_gpu_devices_and_share_reach_the_process(tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    spec = ServiceSpec(
        name="gpusvc",
        gpu=True,
        command=["{python}", "-c", WRITE, "{gpu_memory_utilization}", str(out)],
        gpu_devices=[1],
        gpu_share=0.61,
    )
    rt = ProcessRuntime(tmp_path)
    handle = await rt.start(spec, free_port(), tmp_path / "services" / "gpusvc")
    try:
        wait_for(out.exists, 20)
        wait_for(lambda: out.read_text().endswith("}"), 5)
        assert json.loads(out.read_text()) == {"cuda": "1", "share": "0.61"}
    finally:
        await rt.stop("gpusvc", handle, grace=5)


def test_share_placeholder_defaults_to_vllms_own(tmp_path: Path) -> None:
    assert expand("{gpu_memory_utilization}", port=1, data_dir=tmp_path) == "0.9"
    assert expand("{python}", port=1, data_dir=tmp_path, gpu_share=0.5) == sys.executable
