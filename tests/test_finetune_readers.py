"""Readers parse every shared task file (counts checked against the files) and name file:line on bad rows."""
import pytest

from megagpt.errors import MegaGPTError
from megagpt.finetune import readers as R
from megagpt.finetune.tasks import TASKS, get_task


@pytest.mark.parametrize("task,rel,count", [
    ("sst2", "glue/SST-2/dev.tsv", 872), ("rte", "glue/RTE/dev.tsv", 277),
    ("mrpc", "glue/MRPC/dev.tsv", 408), ("stsb", "glue/STS-B/dev.tsv", 1500),
    ("copa", "copa/copa-dev.xml", 500), ("storycloze", "storycloze/val.csv", 1871),
])
def test_shared_dev_files(shared_data, task, rel, count):
    exs, stats = get_task(task).read(shared_data / rel)
    assert len(exs) == count and stats.skipped == 0
    labels = [e.label for e in exs]
    if task == "stsb":
        assert min(labels) >= 0 and max(labels) <= 5 and len(set(labels)) > 10
    else:
        assert set(labels) == {0, 1}


def test_fields_match_the_files(shared_data):
    sst, _ = R.read_glue(shared_data / "glue/SST-2/dev.tsv", "sst2")
    assert sst[0].texts == ["it 's a charming and often affecting journey . "] and sst[0].label == 1
    rte, _ = R.read_glue(shared_data / "glue/RTE/dev.tsv", "rte")
    assert rte[0].texts[1] == "Christopher Reeve had an accident." and rte[0].label == 0   # not_entailment
    assert rte[1].label == 1
    mrpc, _ = R.read_glue(shared_data / "glue/MRPC/dev.tsv", "mrpc")    # file starts with a BOM
    assert mrpc[0].label == 1 and mrpc[0].texts[0].startswith("He said the foodservice pie")
    sts, _ = R.read_glue(shared_data / "glue/STS-B/dev.tsv", "stsb")
    assert sts[0].texts == ["A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."]
    assert sts[0].label == 5.0 and sts[1].label == 4.75
    copa, _ = R.read_copa(shared_data / "copa/copa-dev.xml")
    assert copa[0].texts == ["My body cast a shadow over the grass. What was the cause of this?"]
    assert copa[0].choices == ["The sun was rising.", "The grass was cut."] and copa[0].label == 0
    assert copa[2].label == 1 and copa[0].source.endswith(":5")
    effect = next(e for e in copa if "happened as a result" in e.texts[0])
    assert len(effect.choices) == 2
    sc, _ = R.read_storycloze(shared_data / "storycloze/val.csv")
    assert sc[0].texts[0].startswith("Rick grew up in a troubled household. He never found good support")
    assert sc[0].choices == ["He is happy now.", "He joined a gang."] and sc[0].label == 0


def test_bad_rows_name_file_and_line(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n2\tonly two\n")
    with pytest.raises(MegaGPTError, match=rf"{f}:3: label 'maybe'"):
        R.read_glue(f, "rte")
    exs, stats = R.read_glue(f, "rte", skip_bad=True)
    assert len(exs) == 1 and stats.skipped == 2 and stats.skipped_where == [f"{f}:3", f"{f}:4"]
    s = tmp_path / "sst.tsv"
    s.write_text("sentence\tlabel\ngood\t1\nbad\tx\n")
    with pytest.raises(MegaGPTError, match=rf"{s}:3:"):
        R.read_glue(s, "sst2")
    with pytest.raises(MegaGPTError, match=r":1: header lacks column"):
        R.read_glue(s, "rte")
    c = tmp_path / "val.csv"
    c.write_text("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
                 "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
                 "a,s1,s2,s3,s4,e1,e2,1\nb,s1,\"multi\nline\",s3,s4,e1,e2,3\n")
    with pytest.raises(MegaGPTError, match=rf"{c}:4: AnswerRightEnding='3'"):   # line where the row ends
        R.read_storycloze(c)
    x = tmp_path / "copa.xml"
    x.write_text('<copa-corpus version="1.0">\n<item id="1" asks-for="cause" most-plausible-alternative="1">\n'
                 "<p>P.</p><a1>A.</a1><a2>B.</a2></item>\n"
                 '<item id="2" asks-for="why" most-plausible-alternative="1">\n<p>P.</p><a1>A.</a1><a2>B.</a2></item>\n'
                 "</copa-corpus>\n")
    with pytest.raises(MegaGPTError, match=rf"{x}:4: item 2: asks-for='why'"):
        R.read_copa(x)
    (tmp_path / "broken.xml").write_text("<copa-corpus><item>\n")
    with pytest.raises(MegaGPTError, match="invalid XML"):
        R.read_copa(tmp_path / "broken.xml")
    with pytest.raises(MegaGPTError, match="no such file"):
        R.read_glue(tmp_path / "missing.tsv", "sst2")


def test_single_file_split_is_deterministic(shared_data):
    task = TASKS["copa"]
    train, ev = task.load(shared_data)
    assert (len(train), len(ev)) == (400, 100)
    assert train[0].source.endswith(":5") and ev == task.load(shared_data)[1]
    train, ev = TASKS["storycloze"].load(shared_data, train_fraction=0.5)
    assert len(train) + len(ev) == 1871 and abs(len(train) - len(ev)) <= 1
    with pytest.raises(MegaGPTError):
        R.split_examples([1, 2], 1.0)


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


@pytest.mark.parametrize("task,header,row", [
    ("stsb", STSB_HEADER, '0\tg\tf\t2012\t1\ts\ts\t"A man\tdances."\tA man is dancing.\t4.5\n'),
    ("sst2", "sentence\tlabel\n", '"a fine\tfilm"\t1\n'),
    ("rte", "index\tsentence1\tsentence2\tlabel\n", '0\t"P\tQ"\tH\tentailment\n'),
], ids=["stsb", "sst2", "rte"])
def test_tab_inside_a_quoted_sentence_is_a_bad_row_in_every_glue_reader(tmp_path, task, header, row):
    """GLUE TSVs have no quoting, so the tab splits the row: one column too many is refused (it
    used to drop half of an STS-B sentence with exit 0); --skip-bad counts it."""
    f = tmp_path / "dev.tsv"
    f.write_text(header + row)
    n = header.count("\t") + 1
    with pytest.raises(MegaGPTError, match=rf"^{f}:2: expected {n} tab-separated columns, got {n + 1}$"):
        R.read_glue(f, task)
    exs, stats = R.read_glue(f, task, skip_bad=True)
    assert exs == [] and (stats.rows, stats.skipped, stats.skipped_where) == (1, 1, [f"{f}:2"])


def test_non_utf8_bytes_name_file_line_and_offset(tmp_path):
    """Latin-1 bytes give one MegaGPTError with file:line and byte offset, not a UnicodeDecodeError."""
    tsv = tmp_path / "dev.tsv"
    tsv.write_bytes("sentence\tlabel\ngood\t1\ncaf\xe9 noir\t0\n".encode("latin-1"))
    xml = tmp_path / "copa.xml"
    xml.write_bytes('<copa-corpus>\n<item id="1" asks-for="cause" most-plausible-alternative="1">\n'
                    "<p>Caf\xe9.</p><a1>A.</a1><a2>B.</a2></item>\n</copa-corpus>\n".encode("latin-1"))
    csv_ = tmp_path / "val.csv"
    csv_.write_bytes(("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
                      "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
                      "a,s1,s2,s3,s4,e1,e2,1\nb,s1,na\xefve,s3,s4,e1,e2,2\n").encode("latin-1"))
    for path, read in ((tsv, lambda p: R.read_glue(p, "sst2", skip_bad=True)), (xml, R.read_copa),
                       (csv_, R.read_storycloze)):
        raw = path.read_bytes()
        offset = next(i for i, b in enumerate(raw) if b > 0x7f)
        assert raw.count(b"\n", 0, offset) == 2
        want = rf"^{path}:3: not UTF-8 \(byte 0x{raw[offset]:02x} at offset {offset}\)"
        with pytest.raises(MegaGPTError, match=want):
            read(path)
