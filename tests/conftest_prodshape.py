"""Fixture plugin: the production-shaped cluster (tests/prodshape.py), built once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prodshape import ProdCluster, build_prod_cluster

# A physical backup of a cluster with a user tablespace needs whole-cluster tablespace support in
# the backup path; switch this on once that has landed.
PROD_TABLESPACE = True


@pytest.fixture(scope="session")
def prod_cluster() -> Iterator[ProdCluster]:
    """The production-shaped cluster (see tests/prodshape.py for what it holds). Read-only for
    tests: inject faults into restored copies; ``prod_cluster.writes()`` is the sanctioned load."""
    prod = build_prod_cluster(tablespace=PROD_TABLESPACE)
    try:
        yield prod
    finally:
        prod.destroy()
