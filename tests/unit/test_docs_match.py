"""docs/operations.md shows lines the software prints: each sample here is produced by the code
and compared with the page, so that an operator who greps for a documented line finds it."""

import logging
import os
import re

from swarmd.identity import NodeIdentity, short_id
from swarmd.transport.access import AccessControl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def operations() -> str:
    with open(os.path.join(ROOT, "docs", "operations.md")) as f:
        return f.read()


def test_the_documented_refusal_line_is_the_one_logged(tmp_path, caplog):
    keys = tmp_path / "peers.d"
    keys.mkdir()
    access = AccessControl("private", str(keys), NodeIdentity(os.urandom(32)).public_key)
    stranger = NodeIdentity(os.urandom(32)).public_key
    caplog.set_level(logging.WARNING, logger="swarmd.access")
    assert access.callback("*", stranger.encode()) is False
    (record,) = [r for r in caplog.records if r.name == "swarmd.access"]
    logged = f"{record.levelname} {record.name}: {record.getMessage()}"
    (sample,) = re.findall(r"^\s*(WARNING swarmd\.access: refused peer .*)$", operations(), re.M)
    expected = (sample.replace("955c376f", short_id(stranger)).replace("KEY-OF-BETA", stranger)
                .replace("/etc/swarmd/peers.d", str(keys)))
    assert logged == expected
    table = re.search(r"^\| `(refused peer [^`]*)` \|", operations(), re.M).group(1)
    pattern = re.escape(table).replace("ID", "[0-9a-f]{8}").replace("KEY", r"\S{40}").replace("DIR", ".+")
    assert re.fullmatch(pattern, record.getMessage())
