from __future__ import annotations

import pytest

from trainkit import History


def history() -> History:
    h = History()
    h.append({"epoch": 0, "train_loss": 0.9, "val_loss": 0.8, "seconds": 1.25})
    h.append({"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "seconds": 1.5})
    return h


def test_columns_and_rows() -> None:
    h = history()
    assert len(h) == 2
    assert h["val_loss"] == [0.8, 0.6]
    assert h[-1] == {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "seconds": 1.5}
    assert h.keys() == ["epoch", "train_loss", "val_loss", "seconds"]
    assert [r["epoch"] for r in h] == [0, 1]


def test_unknown_name_lists_what_exists() -> None:
    with pytest.raises(KeyError, match=r"'val_acc'.*Recorded names: \['epoch', 'train_loss'"):
        history()["val_acc"]


def test_a_misspelled_name_gets_the_close_match() -> None:
    # the input: History["val_los"]
    with pytest.raises(KeyError, match=r"History has no 'val_los'\. Did you mean 'val_loss'\?"):
        history()["val_los"]
    with pytest.raises(KeyError, match=r"Did you mean 'val_loss'\? \(validation figures are"):
        history()["loss"]
    with pytest.raises(KeyError) as info:
        history()["zzz"]
    assert "Did you mean" not in str(info.value)


def test_a_history_built_by_hand_is_running_until_fit_sets_its_status() -> None:
    h = history()
    assert (h.status, h.stop_reason) == ("running", None)


def test_prints_as_an_aligned_table() -> None:
    lines = str(history()).splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "val_loss", "seconds"]
    assert lines[1].split() == ["0", "0.9000", "0.8000", "1.2500"]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns
    assert str(History()) == "History (no epochs)"
    assert repr(history()) == "History(2 epochs: epoch, train_loss, val_loss, seconds)"


def test_missing_values_show_as_dashes() -> None:
    h = History([{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5, "val_loss": 0.4}])
    assert str(h).splitlines()[1].split() == ["0", "1.0000", "-"]
    assert h["val_loss"] == [0.4]
