import pytest

from tests.utils import one_intra_op_thread

_one_thread = pytest.fixture(autouse=True, scope="package")(one_intra_op_thread)
