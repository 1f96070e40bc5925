"""Guard against a Qt binding that corrupts Python's reference counts.

PySide6-Essentials 6.12.0 on Python 3.11 decrements ``None``'s reference count on every Python
slot call; napari then aborts ("Fatal Python error: none_dealloc") after a few thousand signals,
e.g. a progress timer during a long Segment run. pyproject caps the binding; this test fails if an
affected binding is installed anyway.
"""

from __future__ import annotations

import sys

import pytest


@pytest.mark.gui
def test_python_slots_keep_none_refcount(qapp):
    if sys.version_info >= (3, 12):
        pytest.skip("None is immortal from Python 3.12 on")
    from qtpy.QtCore import QTimer

    # The leak is on slots called from C++-emitted signals (a timer's timeout, Qt events).
    calls = []
    timer = QTimer()
    timer.timeout.connect(lambda: calls.append(1))
    timer.start(0)
    before = sys.getrefcount(None)
    for _ in range(1000):
        qapp.processEvents()
    after = sys.getrefcount(None)
    timer.stop()
    assert len(calls) > 100
    assert after - before > -50, f"None lost {before - after} references in {len(calls)} slot calls"
