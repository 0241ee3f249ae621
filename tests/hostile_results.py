"""What a site with a valid kit but hostile intent can send instead of a result (POC only):
a tensor file whose header is built to crash a careless decoder. It goes through the site's
own agent exactly as an honest result would (the agent forwards files, it does not judge them).

Tests copy this file into a toy recipe folder as ``hostile.py``; ``client.py --evil`` uses it."""

import hashlib
import json
import struct

from fedctl.client import channel
from fedctl.codec import protocol
from fedctl.codec.protocol import ResultTaken, ScriptResult


def _file(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def hostile_bytes(mode: str) -> bytes:
    """The payload of a hostile result file."""
    if mode == "deep":  # nested JSON far deeper than any parser's recursion limit
        return _file(b"[" * 50_000 + b"]" * 50_000)
    if mode == "bigint":  # an integer of thousands of digits
        return _file(
            b'{"p:fc.bias":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'
        )
    if mode == "overflow":  # a zero dimension beside ones whose product overflows torch
        spec = {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}
        return _file(json.dumps({"p:fc.bias": spec}).encode())
    raise ValueError(mode)


def send_hostile_file(mode: str, current_round: int) -> None:
    """Answer the current task with a hostile result file, bypassing fedctl.client.send."""
    ch = channel.current()
    assert ch is not None and ch.task is not None
    data = hostile_bytes(mode)
    path = ch._result_dir / f"result.hostile.{current_round}.safetensors"
    path.write_bytes(data)
    header = {
        "params_type": "FULL",
        "metrics": {},
        "start_round": 0,
        "current_round": current_round,
        "total_rounds": None,
        "meta": {"NUM_STEPS_CURRENT_ROUND": 1},
        "has_params": True,
        "has_optimizer_params": False,
    }
    sha = hashlib.sha256(data).hexdigest()
    protocol.send(ch.conn, ScriptResult(ch.task.task_id, header, str(path), sha))
    assert protocol.recv(ch.conn, ResultTaken) is not None
    ch.answered = True
