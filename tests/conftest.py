"""Make the top-level stage scripts and common.py importable from tests."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_stage(name: str):
    """Stage files start with a digit (00_prepare_data.py), so they are imported by name."""
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def embedded_model_path():
    import common
    return common.resolve_model(common.DEFAULT_MODEL)
