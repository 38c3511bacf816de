from marvin_faust.app import CLEAN_SHUTDOWN_MARKER, discard_unclean_state


def test_state_left_by_a_crash_is_dropped(tmp_path):
    (tmp_path / "conversation-history-0.db").mkdir()
    (tmp_path / "conversation-history-0.db" / "000001.sst").write_bytes(b"x")
    (tmp_path / "stray").write_text("x")
    assert discard_unclean_state(tmp_path) is True
    assert list(tmp_path.iterdir()) == []


def test_state_left_by_a_clean_shutdown_is_kept_and_the_marker_consumed(tmp_path):
    (tmp_path / "conversation-history-0.db").mkdir()
    (tmp_path / CLEAN_SHUTDOWN_MARKER).touch()
    assert discard_unclean_state(tmp_path) is False
    assert [p.name for p in tmp_path.iterdir()] == ["conversation-history-0.db"]
    # the next start without a new marker (this run crashed) drops it
    assert discard_unclean_state(tmp_path) is True


def test_no_state_nothing_to_drop(tmp_path):
    assert discard_unclean_state(tmp_path / "missing") is False
    assert discard_unclean_state(tmp_path) is False


def test_the_app_runs_on_the_fixed_transport_and_table_recovery(unit_app):
    from marvin_faust import faust_fixes

    assert isinstance(unit_app.transport, faust_fixes.Transport)
    assert isinstance(unit_app.tables, faust_fixes.TableManager)
    assert isinstance(unit_app.tables.recovery, faust_fixes.Recovery)
