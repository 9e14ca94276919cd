"""SASRec data: the readers (SASRec text, interaction tables, MovieLens) and their errors, splits, filters,
training windows, the MovieLens download."""

import hashlib
import os
import zipfile

import numpy as np
import pandas as pd
import pytest

from largevocab.integrations.sasrec import (
    SequenceData,
    TrainBatches,
    download_movielens_1m,
    filter_min_interactions,
    leave_one_out,
    read_interactions,
    read_movielens_ratings,
    read_sasrec_txt,
    table_to_sequences,
    temporal_split,
)

# Tiny tensors: the shared fixture runs this module on one intra-op thread (see conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize(("line", "why"), [
    ("1 2 3", "expected 'user item'"), ("1", "expected 'user item'"), ("1 x", "ids must be integers"),
    ("1 2.5", "ids must be integers"), ("0 5", "ids start at 1"), ("3 0", "ids start at 1"),
])
def test_reader_rejects_malformed_lines_with_file_and_line(tmp_path, line, why):
    path = tmp_path / "bad.txt"
    path.write_text(f"1 1\n1 2\n\n{line}\n2 3\n")
    with pytest.raises(ValueError, match=rf"bad\.txt:4: {why}"):
        read_sasrec_txt(path)


@pytest.mark.parametrize(("raw", "why"), [
    (b"1 \xff\xfe\n", "not valid UTF-8"), (b"1 9223372036854775808\n", "item id 9223372036854775808 does not fit"),
    (b"99999999999999999999999 1\n", "user id 99999999999999999999999 does not fit in int64"),
    ("1 \uff15\n".encode(), "ids must be integers"),
    (b"1 1_0\n", "ids must be integers"), (b"1 -3\n", "ids must be integers"), (b"1 +3\n", "ids must be integers"),
])
def test_reader_rejects_bad_bytes_and_huge_ids_with_file_and_line(tmp_path, raw, why):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"1 1\n\n2 2\n" + raw + b"2 3\n")
    with pytest.raises(ValueError, match=rf"bad\.txt:4: {why}"):
        read_sasrec_txt(path)
    path.write_bytes(b"1 9223372036854775807\n")  # the largest int64 is an id like any other
    assert read_sasrec_txt(path).sequences[0].tolist() == [2**63 - 1]
    path.write_bytes(b"\n\n")
    with pytest.raises(ValueError, match="no interactions"):
        read_sasrec_txt(path)


@pytest.mark.parametrize(("text", "line", "why"), [
    ("user,item,timestamp\n1,2,3\n1,3,4,5\n", 3, "expected 3 fields"),
    ("user,item,timestamp\n1,2,3\n1,3\n", 3, "expected 3 fields"),
    ("user,item,timestamp\n1,2,3\n\n1,3,\n", 4, "missing timestamp"),
    ("user,item,timestamp\n1,2,3\n,3,4\n", 3, "missing user"),
    ("user,item,timestamp\n1,2,9\n1,3,10x\n", 3, "timestamp must be a number, got '10x'"),
    ("user,item,timestamp\n1,2,9\n1,3,2026-01-01\n", 3, "timestamp must be a number"),
    ("user,item,timestamp\n1,2,9.5\n1,3,nan\n", 3, "timestamp must be a number"),
    ("user,item,timestamp\n1,2,9.5\n1,3,1e999\n", 3, "timestamp '1e999' is not finite"),
    ("user,item,timestamp\n1,2,3\n1,99999999999999999999,4\n", 3, "item id 99999999999999999999 does not fit"),
    ('user,item,timestamp\n1,2,3\n1,"3\n', 3, "expected 3 fields|malformed CSV"),
])
def test_table_reader_rejects_malformed_rows_with_file_and_line(tmp_path, text, line, why):
    path = tmp_path / "log.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"log\.csv:{line}: ({why})"):
        read_interactions(path)


def test_table_reader_rejects_empty_binary_and_unreadable_files(tmp_path):
    path = tmp_path / "log.csv"
    for raw, why in [(b"", ": empty file"), (b"\n \n", ": empty file"), (b"user,item,timestamp\n", ": no interactions"),
                     (b"user,item,timestamp\n1,2,3\n\x89PNG\r\n\x1a\n\x00\x00", ":3: not valid UTF-8"),
                     (b"user,item,timestamp\n1,2,3\n1,\x00,4\n", ":3: NUL byte")]:
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=rf"log\.csv{why}"):
            read_interactions(path)
    bad_parquet = tmp_path / "log.parquet"
    bad_parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"log\.parquet: not a readable Parquet file"):
        read_interactions(bad_parquet)
    with pytest.raises(ValueError, match="no such file"):
        read_interactions(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="sep must be one character"):
        path.write_text("user,item,timestamp\n1,2,3\n")
        read_interactions(path, sep="::")


def test_table_reader_parses_numbers_so_timestamps_sort_numerically(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("item\tuser\ttimestamp\textra\nb\tu1\t10\tx\na\tu1\t9\ty\n\nc\tu2\t1.5e1\tz\n")
    table = read_interactions(path, sep=None)  # detected: tab
    assert table["timestamp"].dtype == np.float64 and table["timestamp"].tolist() == [10.0, 9.0, 15.0]
    assert table["user"].tolist() == ["u1", "u1", "u2"]  # non-integer ids stay strings
    assert [s.tolist() for s in table_to_sequences(table).sequences] == [[1, 2], [3]]  # 9 before 10
    path.write_text("user,item,timestamp\n1,7,10\n1,8,9\n")
    table = read_interactions(path)
    assert table.dtypes.tolist() == [np.int64] * 3
    assert [s.tolist() for s in table_to_sequences(table).sequences] == [[2, 1]]
    frame = pd.DataFrame({"user": [1, 1], "item": [3, 4], "timestamp": ["10", "9"]})
    frame.to_parquet(tmp_path / "s.parquet")  # string timestamps in Parquet are parsed too
    assert read_interactions(tmp_path / "s.parquet")["timestamp"].tolist() == [10, 9]
    frame.assign(timestamp=["10", "x"]).to_parquet(tmp_path / "s.parquet")
    with pytest.raises(ValueError, match=r"s\.parquet: data row 2: timestamp must be a number"):
        read_interactions(tmp_path / "s.parquet")
    frame.assign(timestamp=[1.0, float("nan")]).to_parquet(tmp_path / "s.parquet")
    with pytest.raises(ValueError, match=r"s\.parquet: data row 2: missing timestamp"):
        read_interactions(tmp_path / "s.parquet")
    frame.assign(timestamp=pd.to_datetime(["2020-01-02", "2020-01-01"])).to_parquet(tmp_path / "s.parquet")
    assert read_interactions(tmp_path / "s.parquet")["timestamp"].is_monotonic_decreasing


@pytest.mark.parametrize(("raw", "why"), [
    (b"1::10::5\n", "expected 'user::item::rating::timestamp', got 3 fields"),
    (b"1::10::5::97830076x\n", "timestamp must be a non-negative integer"),
    (b"1::10::5::978300760::1\n", "expected .*, got 5 fields"), (b"1::\xff::5::978300760\n", "not valid UTF-8"),
    (b"1::99999999999999999999::5::1\n", "item 99999999999999999999 does not fit in int64"),
])
def test_movielens_reader_rejects_malformed_lines(tmp_path, raw, why):
    path = tmp_path / "ratings.dat"
    path.write_bytes(b"1::10::5::978300760\n\n" + raw)
    with pytest.raises(ValueError, match=rf"ratings\.dat:3: {why}"):
        read_movielens_ratings(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="no ratings"):
        read_movielens_ratings(path)


def test_reader_groups_users_in_order(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("5 3\n5 1\n2 7\n5 2\n")
    data = read_sasrec_txt(path)
    assert data.user_ids.tolist() == [5, 2] and data.num_items == 7
    assert [s.tolist() for s in data.sequences] == [[3, 1, 2], [7]]
    assert data.item_counts().tolist() == [0, 1, 1, 1, 0, 0, 0, 1]


def test_leave_one_out_on_a_toy_log():
    data = SequenceData([np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([2, 4, 6])], 6, np.arange(3))
    split = leave_one_out(data)
    assert [s.tolist() for s in split.train] == [[1, 2], [5, 6], [2]]
    assert [s.tolist() for s in split.valid_inputs] == [[1, 2], [2]] and split.valid_targets.tolist() == [3, 4]
    assert [s.tolist() for s in split.test_inputs] == [[1, 2, 3], [2, 4]] and split.test_targets.tolist() == [4, 6]


def test_temporal_split_on_a_toy_log():
    rows = [  # user, item, timestamp
        ("a", 10, 1), ("a", 11, 2), ("a", 12, 3),  # train-only user
        ("b", 11, 4), ("b", 12, 5), ("b", 13, 6),  # train-only user
        ("c", 10, 1), ("c", 12, 97), ("c", 10, 98), ("c", 99, 98), ("c", 11, 99),  # test user, 99 unseen in train
        ("d", 10, 2), ("d", 11, 100),  # test user with too few test-period interactions
    ] + [("e", 13, t) for t in range(7, 18)]
    table = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    split = temporal_split(table, quantile=0.83)  # 24 timestamps: position 0.83 * 23 -> 19 (nearest): 97
    assert split.info["cut_timestamp"] == 97
    assert split.item_ids.tolist() == [0, 10, 11, 12, 13]  # item 99 never seen in training: dropped
    assert len(split.train) == 3  # a, b, e; c and d are test users, removed from training entirely
    assert [s.tolist() for s in split.train] == [[1, 2, 3], [2, 3, 4], [4] * 11]
    # c from t*: 12, 10, (99 dropped), 11 -> valid: [12] -> 10, test: [12, 10] -> 11. d has 1 test item: skipped.
    assert [s.tolist() for s in split.valid_inputs] == [[3]] and split.valid_targets.tolist() == [1]
    assert [s.tolist() for s in split.test_inputs] == [[3, 1]] and split.test_targets.tolist() == [2]


def test_filters_and_reindexing(tmp_path):
    table = pd.DataFrame({"uid": [1, 1, 1, 2, 2, 3], "iid": [7, 8, 7, 7, 9, 7], "ts": [3, 1, 2, 1, 2, 1]})
    path = tmp_path / "log.csv"
    table.to_csv(path, index=False)
    read = read_interactions(path, user_col="uid", item_col="iid", time_col="ts")
    assert list(read.columns) == ["user", "item", "timestamp"]
    filtered = filter_min_interactions(read, min_item=2, min_user=2)  # item 8, 9 go; then users 2, 3 go
    assert sorted(filtered["item"].unique()) == [7] and sorted(filtered["user"].unique()) == [1]
    data = table_to_sequences(read)
    assert data.item_ids.tolist() == [0, 7, 8, 9]
    assert [s.tolist() for s in data.sequences] == [[2, 1, 1], [1, 3], [1]]  # time-ordered, re-indexed
    read.to_parquet(tmp_path / "log.parquet")
    assert read_interactions(tmp_path / "log.parquet").equals(read)
    with pytest.raises(ValueError, match="missing column"):
        read_interactions(path)


def test_train_batches_are_right_aligned_windows():
    batches = TrainBatches([np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8]), np.array([9])], max_len=4,
                           batch_size=8)
    assert len(batches.histories) == 2  # a 1-item history has no transition
    inputs, targets = batches.collate(batches.histories)
    assert inputs.tolist() == [[2, 3, 4, 5], [0, 0, 0, 7]]
    assert targets.tolist() == [[3, 4, 5, 6], [0, 0, 0, 8]]
    assert sum(len(x) for x, _ in batches) == 2


def test_train_batches_drop_last_keeps_full_batches_of_a_fresh_order_each_epoch():
    histories = [np.array([i, i + 1]) for i in range(1, 12)]  # 11 histories, batches of 4
    kept = TrainBatches(histories, max_len=2, batch_size=4)
    dropped = TrainBatches(histories, max_len=2, batch_size=4, drop_last=True)
    assert (len(kept), [len(x) for x, _ in kept]) == (3, [4, 4, 3])
    assert len(dropped) == 2
    seen = []
    for _ in range(3):
        sizes, firsts = zip(*[(len(x), x[:, -1].tolist()) for x, _ in dropped], strict=True)
        assert sizes == (4, 4)
        seen.append(sorted(sum(firsts, [])))
    assert len({tuple(s) for s in seen}) > 1  # a different 3 histories wait out each epoch
    with pytest.raises(ValueError, match="drop_last with 11 training histories and batch_size 12"):
        TrainBatches(histories, max_len=2, batch_size=12, drop_last=True)


def _fake_archive(folder):
    archive = folder / "source.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::10::5::978300760\n1::11::3::978302109\n2::10::4::978301968\n")
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_movielens_download_checks_sha256_and_extracts(tmp_path):
    archive, digest = _fake_archive(tmp_path)
    dest = tmp_path / "dest"
    ratings = download_movielens_1m(dest, url=archive.as_uri(), sha256=digest)
    table = read_movielens_ratings(ratings)
    assert table.shape == (3, 4) and table["item"].tolist() == [10, 11, 10]
    archive.unlink()  # a second call finds the verified archive and does not download
    assert download_movielens_1m(dest, url=archive.as_uri(), sha256=digest) == ratings


def test_movielens_download_rejects_a_wrong_checksum(tmp_path):
    archive, _ = _fake_archive(tmp_path)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="SHA-256"):
        download_movielens_1m(dest, url=archive.as_uri(), sha256="0" * 64)
    assert os.listdir(dest) == []  # nothing half-downloaded is left behind


# ---------------------------------------------------------------- training, checkpoints, CLI
