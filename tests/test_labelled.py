"""Loading labelled data: formats, field guessing per task, built-in sets, errors that say where, labels."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmforge.data.labelled import (BUILTIN_SETS, Loaded, build_label_map, check_labels, holdout, load_examples,
                                   input_field_guesses, load_questions, load_texts,
                                   resolve_data)
from lmforge.errors import LmforgeError


def write(path: Path, content: str | bytes) -> Path:
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def jsonl(path: Path, *objs) -> Path:
    return write(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs))


def error(*args, **kwargs) -> str:
    with pytest.raises(LmforgeError) as exc:
        load_examples(*args, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def assert_has(msg: str, *fragments: str) -> None:
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


# ------------------------------------------------------------------------------------------- formats

CLASSIFY_ROWS = [{"sentence": "good film", "label": 1}, {"sentence": "bad film", "label": 0}]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl_plain_and_gzip(tmp_path, name):
    path = write(tmp_path / name, "\n" + "".join(json.dumps(o) + "\n" for o in CLASSIFY_ROWS))
    got = load_examples(str(path), "classify")
    assert got.rows == [{"text": "good film", "text_pair": None, "label": 1},
                        {"text": "bad film", "text_pair": None, "label": 0}]
    assert got.line_numbers == [2, 3]  # the blank first line still counts
    assert got.fields == {"text": "sentence", "label": "label"}
    assert got.source == str(path) and got.skipped == [] and len(got) == 2


@pytest.mark.parametrize("name", ["d.json", "d.json.gz"])
def test_json_list_reports_lines_of_each_object(tmp_path, name):
    path = write(tmp_path / name, json.dumps(CLASSIFY_ROWS + [{"sentence": "", "label": 1}], indent=2))
    assert load_examples(str(path), "classify", skip_bad_rows=True).line_numbers == [2, 6]
    assert_has(error(str(path), "classify"), f"{name}:10:", "'sentence'", "empty")


def test_json_data_wrapper_of_flat_records(tmp_path):
    path = write(tmp_path / "d.json", json.dumps({"version": 1, "data": CLASSIFY_ROWS}))
    assert [r["label"] for r in load_examples(str(path), "classify").rows] == [1, 0]


def test_squad_nested_json_is_flattened(tmp_path):
    ctx = "Paris is the capital of France."
    squad = {"version": "v2.0", "data": [{"title": "France", "paragraphs": [{"context": ctx, "qas": [
        {"id": "q1", "question": "What is the capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q2", "question": "What is the capital of Spain?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Paris", "answer_start": 0}]},
    ]}]}]}
    path = write(tmp_path / "squad.json", json.dumps(squad, indent=1))
    got = load_examples(str(path), "qa")
    assert got.rows == [
        {"id": "q1", "question": "What is the capital?", "context": ctx,
         "answers": {"text": ["Paris"], "answer_start": [0]}},
        {"id": "q2", "question": "What is the capital of Spain?", "context": ctx,
         "answers": {"text": [], "answer_start": []}},
    ]
    text = path.read_text().splitlines()
    assert [text[n - 1].strip() for n in got.line_numbers] == ["{", "{"]
    assert got.line_numbers[0] < got.line_numbers[1]

    squad["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
    write(path, json.dumps(squad))  # minified, like the official files: the JSON path locates the record
    assert_has(error(str(path), "qa"), "squad.json:1", "data[0].paragraphs[0].qas[0]", "'answers'",
               "answer_start 3 does not match the context: found 'is is', expected 'Paris'")


@pytest.mark.parametrize("name", ["d.csv", "d.csv.gz"])
def test_csv_numbers_multiline_cells_and_lines(tmp_path, name):
    path = write(tmp_path / name, '\ufeffreview,sentiment\n"great,\nreally",pos\n\nawful,neg\n ,pos\n')
    got = load_examples(str(path), "classify", skip_bad_rows=True)
    assert got.rows[0] == {"text": "great,\nreally", "text_pair": None, "label": "pos"}
    assert got.line_numbers == [2, 5]  # a record spanning lines is reported where it starts
    assert got.fields == {"text": "review", "label": "sentiment"}
    assert_has(got.skipped[0], f"{name}:6:", "'review'", "empty")

    write(path, "text,label\nfine,1\nmeh,0\n")
    assert [r["label"] for r in load_examples(str(path), "classify").rows] == [1, 0]  # text cells -> ints


def test_csv_row_with_wrong_column_count(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\nok,1\nextra,1,2\n")
    assert_has(error(str(path), "classify"), "d.csv:3:", "3 columns, but the header has 2")


def test_tsv_keeps_bare_quotes(tmp_path):
    path = write(tmp_path / "d.tsv", 'sentence1\tsentence2\tlabel\nHe said "hi\tShe left\t1\nx\ty\t0\n')
    got = load_examples(str(path), "classify")
    assert got.rows[0] == {"text": 'He said "hi', "text_pair": "She left", "label": 1}
    assert got.fields == {"text": "sentence1", "text_pair": "sentence2", "label": "label"}


def test_parquet_rows_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ctx = "The cat sat on the mat."
    table = pa.table({"question": ["Who sat?", "Where?"], "context": [ctx, ctx],
                      "answers": [{"text": ["The cat"], "answer_start": [0]},
                                  {"text": ["the mat"], "answer_start": [5]}]})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    msg = error(str(path), "qa")
    assert_has(msg, "d.parquet:row 2", "'answers'", "answer_start 5", "(it occurs at 15)")
    got = load_examples(str(path), "qa", skip_bad_rows=True)
    assert got.rows == [{"id": "1", "question": "Who sat?", "context": ctx,
                         "answers": {"text": ["The cat"], "answer_start": [0]}}]
    assert got.line_numbers == [1] and len(got.skipped) == 1


# ------------------------------------------------------------------------------------------- classify

def test_classify_pairs_and_overrides(tmp_path):
    path = jsonl(tmp_path / "nli.jsonl", {"premise": "A man sleeps.", "hypothesis": "A man is awake.",
                                          "Label": "contradiction", "note": "n1"})
    got = load_examples(str(path), "classify")
    assert got.rows == [{"text": "A man sleeps.", "text_pair": "A man is awake.", "label": "contradiction"}]
    assert got.fields == {"text": "premise", "text_pair": "hypothesis", "label": "Label"}  # case-insensitive
    got = load_examples(str(path), "classify", {"text": "hypothesis", "text_pair": None, "label": "note"})
    assert got.rows[0]["text"] == "A man is awake." and got.rows[0]["label"] == "n1"


def test_classify_float_scores(tmp_path):
    path = jsonl(tmp_path / "sts.jsonl", {"sentence1": "a", "sentence2": "b", "score": 3.8})
    assert load_examples(str(path), "classify").rows[0]["label"] == 3.8


def test_chinese_field_names_are_guessed(tmp_path):
    """Chinese column names common in Chinese data sets are guessed like the English ones (which win)."""
    path = write(tmp_path / "zh.csv", "评论,标签\n很好看，推荐,正面\n太无聊了,负面\n")  # full-width comma in text
    got = load_examples(str(path), "classify")
    assert got.fields == {"text": "评论", "label": "标签"} and got.rows[0]["text"] == "很好看，推荐"
    both = jsonl(tmp_path / "both.jsonl", {"text": "a", "文本": "b", "label": 1})
    assert load_examples(str(both), "classify").fields["text"] == "text"
    qa = jsonl(tmp_path / "qa.jsonl", {"问题": "谁？", "上下文": "张三来了。", "答案": "张三"})
    got = load_examples(str(qa), "qa")
    assert got.fields["question"] == "问题" and got.rows[0]["answers"] == {"text": ["张三"], "answer_start": [0]}


# ------------------------------------------------------------------------------------------- qa

def test_qa_answer_shapes(tmp_path):
    ctx = "Ada Lovelace wrote the first program in 1843."
    path = jsonl(tmp_path / "qa.jsonl",
                 {"id": "a", "question": "Who?", "context": ctx, "answers": {"text": ["Ada Lovelace"],
                                                                             "answer_start": [0]}},
                 {"id": 7, "question": "When?", "context": ctx, "answers": [{"text": "1843", "answer_start": 40}]},
                 {"question": "Why?", "context": ctx, "answers": {"text": [], "answer_start": []}})
    got = load_examples(str(path), "qa")
    assert [r["id"] for r in got.rows] == ["a", "7", "3"]  # no id: the line number
    assert got.rows[1]["answers"] == {"text": ["1843"], "answer_start": [40]}
    assert got.rows[2]["answers"] == {"text": [], "answer_start": []}

    scalar = jsonl(tmp_path / "scalar.jsonl",
                   {"query": "What?", "passage": ctx, "answer": "first program", "answer_start": 23},
                   {"query": "Who?", "passage": ctx, "answer": "Lovelace", "answer_start": None},
                   {"query": "How?", "passage": ctx, "answer": ""})
    got = load_examples(str(scalar), "qa")
    assert [r["answers"]["answer_start"] for r in got.rows] == [[23], [4], []]
    assert got.fields["question"] == "query" and got.fields["answers"] == "answer"


def test_qa_answer_errors(tmp_path):
    ctx = "Ada Lovelace wrote the first program."
    path = jsonl(tmp_path / "qa.jsonl", {"question": "Who?", "context": ctx, "answers": "Babbage"})
    assert_has(error(str(path), "qa"), "qa.jsonl:1:", "'answers'", "'Babbage' does not occur in the context")
    path = jsonl(tmp_path / "qa.jsonl", {"question": "Who?", "context": ctx, "answers": 3})
    assert_has(error(str(path), "qa"), "qa.jsonl:1:", "'answers'", "got a number")
    path = jsonl(tmp_path / "qa.jsonl", {"id": "x", "question": "Who?", "context": ctx, "answers": []},
                 {"id": "x", "question": "Who?", "context": ctx, "answers": []})
    assert_has(error(str(path), "qa"), "qa.jsonl:2:", "duplicate id 'x' (first at line 1)")
    path = jsonl(tmp_path / "qa.jsonl", {"question": "Who?", "body": ctx, "answers": []})
    assert_has(error(str(path), "qa"), "qa.jsonl:1:", "no context field", "--context-field",
               "fields: question, body, answers")


# ------------------------------------------------------------------------------------------- sft

SFT_USER_ASSISTANT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize("obj, fields", [
    ({"messages": SFT_USER_ASSISTANT}, {"messages": "messages"}),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
     {"messages": "conversations"}),
    ({"prompt": "Hi", "response": "Hello!"}, {"prompt": "prompt", "response": "response"}),
    ({"prompt": "Hi", "completion": "Hello!"}, {"prompt": "prompt", "response": "completion"}),
    ({"question": "Hi", "answer": "Hello!"}, {"prompt": "question", "response": "answer"}),
    ({"input": "Hi", "output": "Hello!"}, {"prompt": "input", "response": "output"}),
    ({"instruction": "Hi", "input": "", "output": "Hello!"},
     {"prompt": "instruction", "response": "output", "input": "input"}),
    ({"指令": "Hi", "输入": "", "输出": "Hello!"}, {"prompt": "指令", "response": "输出", "input": "输入"}),
    ({"问题": "Hi", "回答": "Hello!"}, {"prompt": "问题", "response": "回答"}),
])
def test_sft_shapes(tmp_path, obj, fields):
    got = load_examples(str(jsonl(tmp_path / "s.jsonl", obj)), "sft")
    assert got.rows == [{"messages": SFT_USER_ASSISTANT}]
    assert got.fields == fields


def test_sft_alpaca_input_and_overrides(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"instruction": "Translate.", "input": "chat", "output": "cat", "alt": "x"})
    got = load_examples(str(path), "sft")
    assert got.rows[0]["messages"] == [{"role": "user", "content": "Translate.\n\nchat"},
                                       {"role": "assistant", "content": "cat"}]
    got = load_examples(str(path), "sft", {"prompt": "input", "response": "alt"})
    assert got.rows[0]["messages"][1]["content"] == "x"


def test_sft_content_parts_are_joined_as_serve_joins_them(tmp_path):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there."}]
    path = jsonl(tmp_path / "p.jsonl", {"messages": [{"role": "user", "content": parts},
                                                     {"role": "assistant", "content": "Hi."}]})
    assert load_examples(str(path), "sft").rows[0]["messages"][0] == {"role": "user", "content": "Hello, there."}
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    path = jsonl(tmp_path / "i.jsonl", {"messages": [{"role": "user", "content": image},
                                                     {"role": "assistant", "content": "A cat."}]})
    assert_has(error(str(path), "sft"), "i.jsonl:1:", "'messages'[0]", "content[1] is 'image_url'", "text parts")


def test_sft_errors(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", {"messages": [{"role": "user", "content": "Hi"}]})
    assert_has(error(str(path), "sft"), "s.jsonl:1:", "'messages'", "no assistant turn")
    path = jsonl(tmp_path / "s.jsonl", {"messages": [{"role": "assistent", "content": "Hi"}]})
    assert_has(error(str(path), "sft"), "s.jsonl:1:", "'messages'[0]", "did you mean 'assistant'")
    path = jsonl(tmp_path / "s.jsonl", {"prompt": "Hi", "reply": "Yo"})
    assert_has(error(str(path), "sft"), "s.jsonl:1:", "no response field", "--response-field", "reply")


# ------------------------------------------------------------------------------------------- translate

def test_translate_language_fields(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", {"id": "Gen.1.1", "en": "In the beginning", "es": "En el principio"})
    got = load_examples(str(path), "translate")
    assert got.rows == [{"source": "In the beginning", "target": "En el principio"}]
    assert got.fields["source"] == "en" and got.fields["target"] == "es"  # the file's order, recorded
    assert got.fields["order"] == "file"
    got = load_examples(str(path), "translate", {"source": "es", "target": "en"})
    assert got.rows[0]["source"] == "En el principio" and "order" not in got.fields
    got = load_examples(str(path), "translate", {"source": "es"})  # the other language is the target
    assert got.fields["target"] == "en"


def test_translate_nested_and_named(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", {"translation": {"zh-cn": "你好", "en": "hello"}})
    got = load_examples(str(path), "translate")
    assert got.rows == [{"source": "你好", "target": "hello"}]
    assert got.fields["source_lang"] == "zh-cn" and got.fields["nested"] == "translation"
    path = jsonl(tmp_path / "t2.jsonl", {"src": "a", "tgt": "b"})
    assert load_examples(str(path), "translate").fields == {"source": "src", "target": "tgt"}


def test_translate_errors(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", {"en": "a", "es": "b", "fr": "c"})
    assert_has(error(str(path), "translate"), "t.jsonl:1:", "en, es, fr", "--source-field", "--target-field")
    path = jsonl(tmp_path / "t.jsonl", {"english": "a"})
    assert_has(error(str(path), "translate"), "t.jsonl:1:", "no source field", "--source-field", "english")
    path = jsonl(tmp_path / "t.jsonl", {"en": "a", "es": "b"}, {"en": "c", "es": ["d"]})
    assert_has(error(str(path), "translate"), "t.jsonl:2:", "'es'", "must be a string, got a list")


# ------------------------------------------------------------------------------------------- built-ins

def test_builtin_names_and_splits():
    assert BUILTIN_SETS["lmforge_qa"] == "qa"
    path, name = resolve_data("rotten_tomatoes:test")
    assert name == "rotten_tomatoes:test" and path.name == "test.jsonl.gz"
    assert resolve_data("rotten_tomatoes", split="validation")[1] == "rotten_tomatoes:validation"
    assert resolve_data("bible_en_es:dev")[1] == "bible_en_es:validation"
    got = load_examples("rotten_tomatoes:test", "classify")
    assert len(got) > 100 and got.source == "rotten_tomatoes:test" and got.fields["label"] == "label"
    assert {r["label"] for r in got.rows} == {0, 1}


def test_builtin_chat_set_is_reproducible_and_split_by_source_split():
    """lmforge_chat is made from the other built-in sets, split for split: no test sentence is a training chat,
    and its generator rebuilds the committed files byte for byte."""
    import subprocess
    import sys

    assert BUILTIN_SETS["lmforge_chat"] == "sft"
    seen = {}
    for split in ("train", "validation", "test"):
        got = load_examples(f"lmforge_chat:{split}", "sft")
        assert got.fields["messages"] == "messages" and len(got) > 100
        raw = [json.loads(line) for line in gzip.open(resolve_data(f"lmforge_chat:{split}")[0], "rt",
                                                      encoding="utf-8")]
        for r in raw:
            assert [m["role"] for m in r["messages"] if m["role"] != "system"][-1] == "assistant"
            assert len(r["tasks"]) == len(r["sources"]) == sum(m["role"] == "assistant" for m in r["messages"])
            for s in r["sources"]:
                assert s.split(":")[1] == split
                seen.setdefault(s.rsplit(":", 2)[0] + ":" + s.rsplit(":", 1)[1], set()).add(split)
        kinds = {k for r in raw for k in r["tasks"]}
        # questions asked of another story's passage, to teach refusing: train only
        assert kinds == {"sentiment_en", "sentiment_zh", "translate_en_es", "translate_es_en", "qa",
                         "qa_unanswerable"} | ({"qa_other_passage"} if split == "train" else set())
        for r in raw:
            if "qa_other_passage" in r["tasks"]:
                assert r["passage_from"].split(":")[1] == "train"
                assert r["messages"][-1]["content"] == "The passage does not say."
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "scripts" / "make_chat_set.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "up to date" in res.stdout, res.stdout + res.stderr


@pytest.fixture
def saved_dataset(tmp_path) -> Path:
    """A DatasetDict (train, dev, test) with a class-label column, as datasets' save_to_disk writes it."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"sentence": ["good", "bad", "fine", "awful"], "label": [1, 0, 1, 0]}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features) for s in ("train", "dev", "test")})
    dd.save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def test_datasets_folders_are_read_with_their_splits_and_label_names(saved_dataset, tmp_path):
    from lmforge.data.labelled import data_splits

    got = load_examples(str(saved_dataset), "classify")
    assert got.source == f"{saved_dataset}:train" and got.fields == {"text": "sentence", "label": "label"}
    assert [r["label"] for r in got.rows] == ["pos", "neg", "pos", "neg"]  # ClassLabel names, not numbers
    assert load_examples(f"{saved_dataset}:validation", "classify").source == f"{saved_dataset}:dev"
    assert data_splits(str(saved_dataset)) == {"validation": f"{saved_dataset}:dev", "test": f"{saved_dataset}:test"}
    assert data_splits("rotten_tomatoes")["test"] == "rotten_tomatoes:test" and data_splits(__file__) == {}
    assert_has(error(f"{saved_dataset}:extra", "classify"), "no split 'extra'", "splits: train, dev, test")
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(tmp_path / "one"))
    assert len(load_examples(str(tmp_path / "one"), "classify")) == 2
    assert_has(error(f"{tmp_path / 'one'}:test", "classify"), "a single data set without splits")
    (tmp_path / "plain").mkdir()
    assert_has(error(str(tmp_path / "plain"), "classify"), "is a folder, and not one written by")


@pytest.fixture
def no_hub(monkeypatch):
    """The hub at a port nothing listens on (refused at once), no offline mode, no proxy."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY",
              "https_proxy", "http_proxy", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port
    import urllib.request
    monkeypatch.setattr(urllib.request, "getproxies", urllib.request.getproxies_environment)  # not macOS's settings


def test_hub_data_sets_fail_offline_in_one_line(no_hub, monkeypatch):
    import datasets

    from lmforge.data import labelled

    def never(*a, **k):
        raise AssertionError("load_dataset called although the hub cannot be reached")

    monkeypatch.setattr(datasets, "load_dataset", never)  # datasets' own retries would take ~25 s per spec
    for spec, named in (("someone/some-set", "someone/some-set:"), ("hf:imdb:test", "hf:imdb:"),
                        ("nyu-mll/glue/sst2", "nyu-mll/glue/sst2:"), ("data/reviwes", "data/reviwes:")):
        assert_has(error(spec, "classify"), named, "no such local file or folder",
                   "hub (127.0.0.1) cannot be reached", "HF_HUB_OFFLINE=1")
    assert_has(error("data/missing.jsonl", "classify"), "no such file, and not a built-in data set")

    # reachable, but datasets fails (no such set, a missing config, no cached copy offline): its first line
    def fails(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/some-set' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", fails)
    monkeypatch.setattr(labelled, "_unreachable_hub", lambda: None)
    assert_has(error("someone/some-set", "classify"), "someone/some-set:",
               "loading it from the Hugging Face hub failed (ConnectionError: Couldn't reach")


def test_offline_mode_and_proxies_are_left_to_datasets(no_hub, monkeypatch):
    from lmforge.data import labelled

    assert labelled._unreachable_hub() == "127.0.0.1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: datasets reads its cache, so it is asked
    assert labelled._unreachable_hub() is None
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")  # a proxy may reach what TCP cannot
    assert labelled._unreachable_hub() is None
    for exempt in ("127.0.0.1", "localhost,127.0.0.1:9"):  # ...but not a host it is told to leave alone
        monkeypatch.setenv("no_proxy", exempt)
        assert labelled._unreachable_hub() == "127.0.0.1", exempt
    monkeypatch.setenv("no_proxy", ".0.0.1")  # a suffix: clients disagree on it, so datasets is asked
    assert labelled._unreachable_hub() is None


def test_builtin_errors(tmp_path):
    with pytest.raises(LmforgeError, match="did you mean 'rotten_tomatoes'"):
        resolve_data("roten_tomatoes:test")
    with pytest.raises(LmforgeError, match="unknown split 'tset'.*did you mean 'test'"):
        resolve_data("rotten_tomatoes:tset")
    with pytest.raises(LmforgeError, match="no such file"):
        resolve_data(str(tmp_path / "missing.jsonl"))
    assert_has(error("rotten_tomatoes", "translate"), "rotten_tomatoes:train", "classify", "bible_en_es")


# ------------------------------------------------------------------------------------------- errors

def test_malformed_json_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    assert_has(error(str(path), "classify"), "d.jsonl:2:", "invalid JSON")
    path = write(tmp_path / "d.json", '[\n  {"text": "a",\n   "label" 1}\n]')
    assert_has(error(str(path), "classify"), "d.json:3:12:", "invalid JSON", "':'")


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_non_utf8_names_line_and_column(tmp_path, name):
    body = (b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n' if name.endswith("jsonl")
            else b"text,label\nok,1\ncaf\xe9,0\n")
    path = write(tmp_path / name, body)
    line_col = ":2:14:" if name.endswith("jsonl") else ":3:4:"
    assert_has(error(str(path), "classify"), name + line_col, "not valid UTF-8")
    # --skip-bad-rows skips such a line like any other bad row, naming it (and for CSV its field)
    kept = load_examples(str(path), "classify", skip_bad_rows=True)
    assert [r["text"] for r in kept.rows] == ["ok"]
    assert kept.skipped == ([f"{path}:2: not valid UTF-8 (byte 0xe9 at column 14)"] if name.endswith("jsonl")
                            else [f"{path}:3: field 'text' is not valid UTF-8 (byte 0xe9 at column 4)"])


def test_missing_field_lists_fields_and_option(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"sentence": "a", "lbl": 1})
    assert_has(error(str(path), "classify"), "d.jsonl:1:", "no label field", "fields: sentence, lbl",
               "--label-field")
    assert_has(error(str(path), "classify", {"text": "sentense"}), "d.jsonl:1:", "no field 'sentense'",
               "did you mean 'sentence'", "--text-field")
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": 1}, {"txt": "b", "label": 0})
    assert_has(error(str(path), "classify"), "d.jsonl:2:", "no field 'text'", "did you mean 'txt'", "--text-field")


def test_empty_text_wrong_type_and_empty_file(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": 1}, {"text": "  ", "label": 1})
    assert_has(error(str(path), "classify"), "d.jsonl:2:", "field 'text' is empty")
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": [0, 1]})
    assert_has(error(str(path), "classify"), "d.jsonl:1:", "'label'", "got a list", "multi-label")
    path = jsonl(tmp_path / "d.jsonl", {"text": 5, "label": 1})
    assert_has(error(str(path), "classify"), "d.jsonl:1:", "'text' must be a string, got a number")
    path = write(tmp_path / "empty.jsonl", "\n\n")
    assert_has(error(str(path), "classify"), "empty.jsonl", "no examples")
    path = write(tmp_path / "empty.csv", "text,label\n")
    assert_has(error(str(path), "classify"), "empty.csv", "no examples")


def test_unknown_task_role_and_file_type(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": 1})
    assert_has(error(str(path), "clasify"), "unknown task 'clasify'", "did you mean 'classify'")
    assert_has(error(str(path), "classify", {"lable": "label"}), "unknown field role 'lable'",
               "did you mean 'label'")
    path = write(tmp_path / "d.xml", "<x/>")
    assert_has(error(str(path), "classify"), "d.xml", "unsupported file type")


def test_skip_bad_rows_reports_each(tmp_path):
    path = write(tmp_path / "d.jsonl", "\n".join([
        '{"text": "a", "label": 1}', "{oops", '[1, 2]', '{"text": "", "label": 0}', '{"text": "b"}',
        '{"text": "c", "label": 0}']) + "\n")
    got = load_examples(str(path), "classify", skip_bad_rows=True)
    assert [r["text"] for r in got.rows] == ["a", "c"] and got.line_numbers == [1, 6]
    assert [s.split(": ", 1)[0] for s in got.skipped] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert_has(got.skipped[0], "invalid JSON")
    assert_has(got.skipped[3], "no field 'label'", "--label-field")
    path = write(tmp_path / "bad.jsonl", '{"text": "", "label": 0}\n{oops\n')
    assert_has(error(str(path), "classify", skip_bad_rows=True), "no examples left after skipping 2 bad rows")


# ------------------------------------------------------------------------------------------- labels

@pytest.mark.parametrize("train, other, expected", [
    ([1, 0, 1, 2], None, ([0, 1, 2], False)),
    (["pos", "neg"], None, (["neg", "pos"], False)),
    ([True, False], None, ([False, True], False)),
    ([1.0, 0.0, 1.0], None, ([0.0, 1.0], False)),
    ([0.5, 3.8, 2.0], None, ([], True)),
    ([1, 2.5], None, ([], True)),
    ([1.0, 2.0], {"validation": [3.5]}, ([], True)),
    ([1, 2], {"validation": ["x"]}, ([1, 2], False)),
])
def test_build_label_map(train, other, expected):
    assert build_label_map(train, other) == expected


def test_build_label_map_needs_two_classes():
    with pytest.raises(LmforgeError, match="single label 'pos'"):
        build_label_map(["pos", "pos"])


def _loaded(labels, lines, source="val.jsonl", by_row=False):
    return Loaded([{"text": "t", "label": x} for x in labels], source, list(lines), by_row=by_row)


def test_unseen_validation_label(tmp_path, capsys):
    check_labels(["neg", "pos"], ["neg", "pos"], _loaded(["neg", "pos"], [1, 2]))
    with pytest.raises(LmforgeError) as exc:
        check_labels(["neg", "postive", "meh"], ["neg", "pos"], _loaded(["neg", "postive", "meh"], [1, 4, 7]))
    assert_has(str(exc.value), "val.jsonl:4:", "label 'postive' never seen in training",
               "did you mean 'pos'", "training labels: 'neg', 'pos'", "1 more")
    with pytest.raises(LmforgeError, match=r"val\.parquet:row 4: label 'postive'"):  # Parquet counts rows
        check_labels(["neg", "postive"], ["neg", "pos"], _loaded(["neg", "postive"], [1, 4], "val.parquet", True))
    # --skip-bad-rows: the rows are dropped and reported, the rest kept
    loaded = _loaded(["neg", "postive", "pos", "meh"], [1, 4, 5, 7])
    check_labels([r["label"] for r in loaded.rows], ["neg", "pos"], loaded, skip=True)
    assert [r["label"] for r in loaded.rows] == ["neg", "pos"] and loaded.line_numbers == [1, 5]
    assert loaded.skipped == ["val.jsonl:4: label 'postive' never seen in training",
                              "val.jsonl:7: label 'meh' never seen in training"]
    assert "skipped 2 row(s) with labels never seen in training" in capsys.readouterr().out
    with pytest.raises(LmforgeError, match="never seen"):  # every row unseen: nothing would be left to score
        check_labels(["meh"], ["neg", "pos"], _loaded(["meh"], [1]), skip=True)


def test_holdout_is_deterministic_and_keeps_duplicates_together():
    rows = [{"text": f"t{i % 50}", "label": i % 2} for i in range(100)]  # every row appears twice
    lines = list(range(1, 101))
    train, val = holdout(rows, lines)
    assert (train, val) == holdout(rows, lines)
    assert sorted(train + val) == list(range(100)) and not set(train) & set(val)
    assert 10 <= len(val) <= 11
    val_texts = {rows[i]["text"] for i in val}
    assert not val_texts & {rows[i]["text"] for i in train}
    assert holdout(rows, lines, seed=1) != (train, val)
    assert len(holdout(rows, lines, fraction=0.5, max_rows=4)[1]) in (4, 5)
    with pytest.raises(LmforgeError, match="--validation"):
        holdout(rows[:1], lines[:1])


def test_holdout_keeps_every_class_in_training():
    # five copies of the only 'neg' row go together: holding them out would leave training without 'neg'
    rows = [{"text": "bad", "label": "neg"}] * 5 + [{"text": f"good {i}", "label": "pos"} for i in range(9)]
    labels = [r["label"] for r in rows]
    lines = list(range(1, 15))
    for seed in range(20):
        train, val = holdout(rows, lines, fraction=0.3, seed=seed, labels=labels)
        assert val and {labels[i] for i in train} == {"neg", "pos"}, seed
        assert not {rows[i]["text"] for i in val} & {rows[i]["text"] for i in train}
    assert any("neg" in {labels[i] for i in holdout(rows, lines, fraction=0.3, seed=s)[1]} for s in range(20))


def test_empty_json_file(tmp_path):
    assert_has(error(str(write(tmp_path / "e.json", "  \n")), "classify"), "e.json", "no examples")
    assert_has(error(str(write(tmp_path / "l.json", "[]")), "classify"), "l.json", "no examples")


def test_load_texts_guesses_or_takes_the_named_field(tmp_path):
    f = jsonl(tmp_path / "in.jsonl", {"Sentence": "a fine film", "id": 1}, {"text": "dull"})
    assert load_texts(str(f)) == [{"text": "a fine film"}, {"text": "dull"}]
    named = jsonl(tmp_path / "named.jsonl", {"review_body": "a fine film", "text": "not this one"})
    assert load_texts(str(named), "review_body") == [{"text": "a fine film"}]
    with pytest.raises(LmforgeError) as exc:
        load_texts(str(f), "review_body")  # a named field is required on every record, exactly as named
    assert_has(str(exc.value), "in.jsonl:1", "review_body", "fields: Sentence, id")
    bad = jsonl(tmp_path / "bad.jsonl", {"text": "fine"}, {"text": 3})
    with pytest.raises(LmforgeError) as exc:
        load_texts(str(bad))
    assert_has(str(exc.value), "bad.jsonl:2", "field 'text' must be a string, got a number")


def test_load_texts_reads_inside_a_translation_object(tmp_path):
    f = jsonl(tmp_path / "tr.jsonl", {"translation": {"en": "Let there be light."}}, {"en": "And there was light."})
    assert load_texts(str(f), guesses=input_field_guesses("translate", "en")) == [
        {"text": "Let there be light."}, {"text": "And there was light."}]


def test_load_texts_reads_conversations_to_continue(tmp_path):
    f = jsonl(tmp_path / "chat.jsonl", {"messages": [{"role": "system", "content": "Be terse."},
                                                     {"role": "user", "content": "Hi"}]},
              {"conversations": [{"from": "human", "value": "Name a river."}]}, {"prompt": "plain"})
    assert load_texts(str(f), guesses=input_field_guesses("sft"), chat=True) == [
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Name a river."}]}, {"text": "plain"}]
    bad = jsonl(tmp_path / "bad.jsonl", {"messages": [{"role": "robot", "content": "x"}]})
    with pytest.raises(LmforgeError) as exc:
        load_texts(str(bad), chat=True)
    assert_has(str(exc.value), "bad.jsonl:1", "role 'robot'")


def test_load_questions_needs_no_answers(tmp_path):
    flat = jsonl(tmp_path / "q.jsonl", {"Question": "Who?", "passage": "Noah did."})
    assert load_questions(str(flat)) == [{"question": "Who?", "context": "Noah did."}]
    nested = tmp_path / "squad.json"
    nested.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": "Noah built the ark.", "qas": [{"id": "1", "question": "Who built the ark?"}]}]}]}))
    assert load_questions(str(nested)) == [{"question": "Who built the ark?", "context": "Noah built the ark."}]
    with pytest.raises(LmforgeError) as exc:
        load_questions(str(jsonl(tmp_path / "bad.jsonl", {"question": "Who?"})))
    assert_has(str(exc.value), "bad.jsonl:1", "no context field")


def test_input_field_guesses_put_the_trained_field_first():
    assert input_field_guesses("classify", "Body")[:2] == ("body", "text")
    assert "review" in input_field_guesses("classify") and "src" in input_field_guesses("translate")
    assert input_field_guesses("sft")[0] == "prompt" and input_field_guesses("qa") == ("text", "sentence", "source",
                                                                                       "prompt", "content")


# ---- review findings (2026-12-02): each of these failed before its fix

def test_csv_nan_label_is_refused_not_a_class(tmp_path):
    f = write(tmp_path / "r.csv", "text,score\na,1.5\nb,2.5\nc,nan\nd,1.5\n")
    assert_has(error(str(f), "classify"), "r.csv:4:", "field 'score' is nan")
    assert [r["label"] for r in load_examples(str(f), "classify", skip_bad_rows=True).rows] == [1.5, 2.5, 1.5]


def test_gzip_suffix_in_capitals_and_corrupt_gzip(tmp_path):
    body = gzip.compress(b'{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    up = tmp_path / "UP.JSONL.GZ"
    up.write_bytes(body)
    assert len(load_examples(str(up), "classify")) == 2
    bad = bytearray(body)
    bad[12:17] = b"\xff" * 5
    corrupt = tmp_path / "c.jsonl.gz"
    corrupt.write_bytes(bytes(bad))
    assert_has(error(str(corrupt), "classify"), "c.jsonl.gz: cannot read")


def test_utf16_file_is_named_as_such(tmp_path):
    f = tmp_path / "excel.csv"
    f.write_bytes("text,label\ngood,1\n".encode("utf-16"))
    assert_has(error(str(f), "classify"), "excel.csv: UTF-16 text", "iconv -f UTF-16")


def test_a_pair_field_is_needed_in_every_record(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", {"sentence1": "a", "sentence2": "b", "label": 1},
              {"sentence1": "c", "sentence2": None, "label": 0}, {"sentence1": "d", "label": 0})
    assert_has(error(str(f), "classify"), "p.jsonl:2:", "field 'sentence2' must be a string, got null")
    kept = load_examples(str(f), "classify", skip_bad_rows=True)
    assert kept.line_numbers == [1] and len(kept.skipped) == 2 and "p.jsonl:3: no field 'sentence2'" in kept.skipped[1]


def test_a_chat_must_start_with_a_user_turn(tmp_path):
    f = jsonl(tmp_path / "c.jsonl", {"messages": [{"role": "system", "content": "s"},
                                                  {"role": "assistant", "content": "Hello!"},
                                                  {"role": "user", "content": "hi"}]})
    assert_has(error(str(f), "sft"), "c.jsonl:1:", "field 'messages'[1]", "starts with an assistant turn")
    with pytest.raises(LmforgeError, match="starts with an assistant turn"):  # predict's conversations too
        load_texts(str(f), chat=True)


def test_skip_bad_rows_skips_a_first_record_without_a_named_field(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", {"text": "a"}, {"text": "b", "label": 1}, {"text": "c", "label": 0})
    kept = load_examples(str(f), "classify", {"label": "label"}, skip_bad_rows=True)
    assert kept.line_numbers == [2, 3] and kept.skipped[0].endswith("no field 'label' (fields: text); set --label-field")
    assert_has(error(str(f), "classify", {"label": "label"}), "d.jsonl:1:", "no field 'label'")  # without: refused


def test_holdout_refuses_when_no_class_can_spare_an_example():
    rows = [{"text": f"t{i}", "label": i} for i in range(5)]
    with pytest.raises(LmforgeError, match="no class has an example to spare.*pass --validation"):
        holdout(rows, [1, 2, 3, 4, 5], labels=[r["label"] for r in rows])


def test_validation_is_read_in_the_training_direction(tmp_path):
    train = load_examples(str(jsonl(tmp_path / "t.jsonl", {"en": "the house", "es": "la casa"})), "translate")
    flipped = jsonl(tmp_path / "v.jsonl", {"es": "el perro", "en": "the dog"})
    assert load_examples(str(flipped), "translate").rows == [{"source": "el perro", "target": "the dog"}]  # alone
    val = load_examples(str(flipped), "translate", prefer=train.fields)
    assert val.rows == [{"source": "the dog", "target": "el perro"}]
    # a file without the trained columns is guessed as before
    other = jsonl(tmp_path / "o.jsonl", {"source": "a", "target": "b"})
    assert load_examples(str(other), "translate", prefer=train.fields).rows == [{"source": "a", "target": "b"}]
    # but another language in the target's place is not the trained direction: refused, not scored silently
    french = jsonl(tmp_path / "f.jsonl", {"en": "the dog", "fr": "le chien"})
    msg = error(str(french), "translate", prefer=train.fields)
    assert "f.jsonl" in msg and "'es'" in msg and "'fr'" in msg and "--target-field" in msg
    assert load_examples(str(french), "translate", {"target": "fr"}, prefer=train.fields).rows[0]["target"] == \
        "le chien"  # named, it is the user's choice


def test_a_pair_classifier_is_not_scored_on_single_texts(tmp_path):
    train = load_examples(str(jsonl(tmp_path / "t.jsonl", {"premise": "a", "hypothesis": "b", "label": 1},
                                    {"premise": "c", "hypothesis": "d", "label": 0})), "classify")
    assert train.fields["text_pair"] == "hypothesis"
    single = jsonl(tmp_path / "v.jsonl", {"premise": "a", "label": 1})
    msg = error(str(single), "classify", prefer=train.fields)
    assert "v.jsonl" in msg and "'hypothesis'" in msg and "--text-pair-field" in msg
    renamed = jsonl(tmp_path / "r.jsonl", {"sentence1": "a", "sentence2": "b", "label": 1})
    assert load_examples(str(renamed), "classify", prefer=train.fields).rows[0]["text_pair"] == "b"


def test_labels_that_would_share_a_name_are_refused(tmp_path):
    from lmforge.data.labelled import check_label_names

    mixed = jsonl(tmp_path / "m.jsonl", {"text": "a", "label": "1"}, {"text": "b", "label": 0},
                  {"text": "c", "label": 1})
    assert_has(error(str(mixed), "classify"), "m.jsonl:1: field 'label': label '1' (a string) and label 1 (a number, "
               "at", "m.jsonl:3) would be two classes with one name")
    with pytest.raises(LmforgeError) as exc:  # rows that did not come from one file are checked again
        check_label_names(_loaded(["1", 0, 1], [1, 2, 3], "m.jsonl"))
    assert_has(str(exc.value), "m.jsonl:3:", "label 1 (a number) and label '1' (a string, at", "m.jsonl:1)")
    check_label_names(load_examples(str(jsonl(tmp_path / "ok.jsonl", {"text": "a", "label": 1.0},
                                              {"text": "b", "label": 1})), "classify"))  # 1.0 == 1: one class


def test_prediction_inputs_name_their_line(tmp_path):
    f = write(tmp_path / "p.jsonl", '{"text": "good film"}\n{"text": "bad film"\n')
    with pytest.raises(LmforgeError, match=r"p\.jsonl:2: invalid JSON"):
        load_texts(str(f))
    q = write(tmp_path / "q.jsonl", '{"question": "Who?", "context": "Noah."}\n{"question": "Who?"\n')
    with pytest.raises(LmforgeError, match=r"q\.jsonl:2: invalid JSON"):
        load_questions(str(q))
    pairs = jsonl(tmp_path / "pairs.jsonl", {"premise": "I loved it", "hypothesis": "good"},
                  {"premise": "I loved it", "hypothesis": "bad"})
    assert load_texts(str(pairs), guesses=("premise",), pair_field="hypothesis") == [
        {"text": "I loved it", "text_pair": "good"}, {"text": "I loved it", "text_pair": "bad"}]
    lone = jsonl(tmp_path / "lone.jsonl", {"premise": "x"})
    with pytest.raises(LmforgeError, match=r"lone\.jsonl:1: no field 'hypothesis'.*text pairs"):
        load_texts(str(lone), guesses=("premise",), pair_field="hypothesis")


def test_qa_ids_may_be_whole_numbers(tmp_path):
    row = {"question": "Who?", "context": "Noah built it.", "answers": {"text": ["Noah"], "answer_start": [0]}}
    assert load_examples(str(jsonl(tmp_path / "q.jsonl", {**row, "id": 7.0})), "qa").rows[0]["id"] == "7"
    assert_has(error(str(jsonl(tmp_path / "f.jsonl", {**row, "id": 7.5})), "qa"),
               "field 'id' must be a string or a whole number, got 7.5")


# ---- audit findings (2026-12-03): each of these failed before its fix

def test_optional_fields_are_found_beyond_the_first_record(tmp_path):
    alpaca = jsonl(tmp_path / "a.jsonl", {"instruction": "Say hi", "output": "hi"},  # Alpaca leaves out an empty input
                   {"instruction": "Add these", "input": "2 3", "output": "5"})
    got = load_examples(str(alpaca), "sft")
    assert got.fields["input"] == "input"
    assert [r["messages"][0]["content"] for r in got.rows] == ["Say hi", "Add these\n\n2 3"]
    # a pair is needed in every record, so the first record without one is the bad one, not every other record
    pairs = jsonl(tmp_path / "p.jsonl", {"premise": "A", "label": 0}, {"premise": "B", "hypothesis": "C", "label": 1},
                  {"premise": "D", "hypothesis": "E", "label": 0})
    assert_has(error(str(pairs), "classify"), "p.jsonl:1:", "no field 'hypothesis'")
    kept = load_examples(str(pairs), "classify", skip_bad_rows=True)
    assert kept.rows[0] == {"text": "B", "text_pair": "C", "label": 1} and kept.line_numbers == [2, 3]
    row = {"question": "Who?", "context": "Noah built it.", "answers": {"text": ["Noah"], "answer_start": [0]}}
    qa = jsonl(tmp_path / "q.jsonl", row, {**row, "id": "q7"})
    assert [r["id"] for r in load_examples(str(qa), "qa").rows] == ["1", "q7"]


def test_an_explicit_sft_input_field(tmp_path):
    f = jsonl(tmp_path / "c.jsonl", {"instruction": "Summarise", "output": "short"},
              {"instruction": "Summarise", "ctx": "LONG DOCUMENT", "output": "short"})
    sft_fields = {"messages": None, "prompt": None, "response": None}
    got = load_examples(str(f), "sft", {**sft_fields, "input": "ctx"})
    assert got.fields["input"] == "ctx" and got.rows[1]["messages"][0]["content"] == "Summarise\n\nLONG DOCUMENT"
    assert got.rows[0]["messages"][0]["content"] == "Summarise"  # a record may leave it out, as Alpaca does
    assert "input" not in load_examples(str(f), "sft", {**sft_fields, "input": None}).fields  # 'ctx': no guess
    msg = error(str(f), "sft", {**sft_fields, "input": "ctxt"}, skip_bad_rows=True)
    assert_has(msg, "c.jsonl: no record has a field 'ctxt'", "did you mean 'ctx'", "--input-field")


def test_predict_inputs_join_alpaca_input_as_training_does(tmp_path):
    rows = [{"instruction": "Add these", "input": "2 3", "output": "5"}, {"instruction": "Say hi", "input": ""},
            {"instruction": "Say bye"}]
    trained = load_examples(str(jsonl(tmp_path / "t.jsonl", rows[0])), "sft").rows[0]["messages"][0]["content"]
    f = jsonl(tmp_path / "p.jsonl", *[{k: v for k, v in r.items() if k != "output"} for r in rows])
    want = [{"text": trained}, {"text": "Say hi"}, {"text": "Say bye"}]
    assert load_texts(str(f), guesses=input_field_guesses("sft"), chat=True, role="prompt") == want
    assert load_texts(str(f), "instruction", role="prompt") == want  # --prompt-field: named exactly
    ctx = jsonl(tmp_path / "ctx.jsonl", {"instruction": "Summarise", "ctx": "DOC"})
    assert load_texts(str(ctx), "instruction", role="prompt", input_field="ctx") == [{"text": "Summarise\n\nDOC"}]
    bad = jsonl(tmp_path / "bad.jsonl", {"instruction": "Add", "input": 5})
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:1: field 'input' must be a string, got a number"):
        load_texts(str(bad), guesses=input_field_guesses("sft"), chat=True, role="prompt")


def test_prediction_inputs_must_not_be_empty(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", {"text": "good film"}, {"text": "  "})
    with pytest.raises(LmforgeError, match=r"p\.jsonl:2: field 'text' is empty"):
        load_texts(str(f))
    prompts = jsonl(tmp_path / "s.jsonl", {"prompt": "Say king."}, {"prompt": ""})
    with pytest.raises(LmforgeError, match=r"s\.jsonl:2: field 'prompt' is empty"):
        load_texts(str(prompts), guesses=input_field_guesses("sft"), chat=True, role="prompt")


@pytest.mark.parametrize("hidden", [-1, None])
def test_a_split_with_hidden_labels_is_not_scored(tmp_path, capsys, hidden):
    import datasets

    from lmforge.data.labelled import data_splits

    label = datasets.ClassLabel(names=["neg", "pos"]) if hidden == -1 else datasets.Value("string")
    features = datasets.Features({"sentence": datasets.Value("string"), "label": label})
    labelled = {"sentence": ["good", "bad"], "label": [1, 0] if hidden == -1 else ["pos", "neg"]}
    test = {"sentence": ["x", "y"], "label": [hidden, hidden]}  # GLUE's test splits: every label -1
    splits = {"train": labelled, "validation": labelled, "test": test}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features)
                          for k, v in splits.items()}).save_to_disk(str(tmp_path / "g"))
    assert data_splits(str(tmp_path / "g")) == {"validation": f"{tmp_path / 'g'}:validation"}
    out = capsys.readouterr().out
    assert f"{tmp_path / 'g'}:test: no labels (every 'label' is -1 or null), so it is not scored" in out


def test_a_number_written_as_a_string_among_numbers(tmp_path):
    scores = [{"text": f"t{i}", "score": 0.1 + 0.37 * i} for i in range(6)]
    scores[2]["score"] = "0.84"
    f = jsonl(tmp_path / "s.jsonl", *scores)
    assert_has(error(str(f), "classify"), "s.jsonl:3:", "field 'score'",
               "label '0.84' is a string among numeric labels")
    kept = load_examples(str(f), "classify", skip_bad_rows=True)  # skipped, and the rest are scores
    assert kept.line_numbers == [1, 2, 4, 5, 6] and build_label_map([r["label"] for r in kept.rows])[1]
    assert_has(kept.skipped[0], "s.jsonl:3:", "label '0.84' is a string")
    flags = jsonl(tmp_path / "b.jsonl", {"text": "a", "label": 1}, {"text": "b", "label": 0},
                  {"text": "c", "label": True})
    assert_has(error(str(flags), "classify"), "b.jsonl:3:", "label True is a boolean among numeric labels")
    words = jsonl(tmp_path / "w.jsonl", {"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                  {"text": "c", "label": 1})
    assert_has(error(str(words), "classify"), "w.jsonl:3:", "label 1 is a number among string labels")
    csv_mixed = write(tmp_path / "m.csv", "text,label\na,1.5\nb,2.5\nc,n/a\n")  # CSV cells are parsed as numbers
    assert_has(error(str(csv_mixed), "classify"), "m.csv:4:", "label 'n/a' is a string among numeric labels")
    # one kind throughout is fine: numbers (CSV or JSON), strings (also numeric ones), booleans
    for name, body in (("n.csv", "text,label\na,1\nb,0.5\n"), ("s.jsonl", '{"text": "a", "label": "0"}\n'
                                                                          '{"text": "b", "label": "1"}\n'),
                       ("t.jsonl", '{"text": "a", "label": true}\n{"text": "b", "label": false}\n')):
        assert len(load_examples(str(write(tmp_path / name, body)), "classify")) == 2


def test_skip_bad_rows_skips_a_first_record_the_fields_cannot_be_guessed_on(tmp_path):
    good = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    f = jsonl(tmp_path / "d.jsonl", {"txt": "oops", "label": "pos"}, *good)
    assert_has(error(str(f), "classify"), "d.jsonl:1:", "no text field", "--text-field")  # without: refused
    kept = load_examples(str(f), "classify", skip_bad_rows=True)
    assert kept.line_numbers == [2, 3] and kept.fields == {"text": "text", "label": "label"}
    assert_has(kept.skipped[0], "d.jsonl:1:", "no text field")
    sft = jsonl(tmp_path / "s.jsonl", {"prompt": "x"}, {"prompt": "Say hi", "response": "hi"})
    assert load_examples(str(sft), "sft", skip_bad_rows=True).line_numbers == [2]
    tr = jsonl(tmp_path / "t.jsonl", {"en": "x"}, {"en": "the dog", "es": "el perro"})
    assert load_examples(str(tr), "translate", skip_bad_rows=True).rows == [{"source": "the dog", "target": "el perro"}]


def test_skip_bad_rows_and_bad_bytes_outside_a_record(tmp_path):
    header = write(tmp_path / "h.csv", b"t\xe9xt,label\nok,1\n")  # no column can be named: the whole file
    assert_has(error(str(header), "classify", skip_bad_rows=True), "h.csv:1: header is not valid UTF-8")
    whole = write(tmp_path / "w.json", b'[{"text": "caf\xe9", "label": 1}]')  # one JSON document
    assert_has(error(str(whole), "classify", skip_bad_rows=True), "w.json:1:", "not valid UTF-8")
    tsv = write(tmp_path / "d.tsv", b"text\tlabel\nok\t1\nno\xff\t0\nfine\t0\n")
    assert load_examples(str(tsv), "classify", skip_bad_rows=True).line_numbers == [2, 4]


# ---- data-loading audit (2026-12-09): each of these failed before its fix

def test_gzip_is_read_by_its_bytes_without_a_gz_suffix(tmp_path):
    """A download saved without its .gz (curl -o data.jsonl) was 'not valid UTF-8 (byte 0x8b ...)'."""
    rows = b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n'
    path = write(tmp_path / "d.jsonl", gzip.compress(rows))
    assert [r["label"] for r in load_examples(str(path), "classify").rows] == [1, 0]
    path = write(tmp_path / "d.csv", gzip.compress(b"text,label\ngood,1\nbad,0\n"))
    assert load_examples(str(path), "classify").line_numbers == [2, 3]


def test_json_lines_named_json_and_a_json_list_named_jsonl(tmp_path):
    """`Dataset.to_json("x.json")` writes JSON Lines (it was 'invalid JSON (Extra data)'); a JSON list saved as
    .jsonl was 'expected a JSON object, got a list', or pretty-printed, an 'invalid JSON' "[" on line 1."""
    lines = write(tmp_path / "d.json", "".join(json.dumps(o) + "\n" for o in CLASSIFY_ROWS))
    got = load_examples(str(lines), "classify")
    assert [r["label"] for r in got.rows] == [1, 0] and got.line_numbers == [1, 2]
    write(lines, json.dumps(CLASSIFY_ROWS[0]) + "\n{oops\n")  # still reported by line, as JSON Lines
    assert_has(error(str(lines), "classify"), "d.json:2:", "invalid JSON")
    for name, body in (("one.jsonl", json.dumps(CLASSIFY_ROWS)), ("pretty.jsonl", json.dumps(CLASSIFY_ROWS, indent=2))):
        got = load_examples(str(write(tmp_path / name, body)), "classify")
        assert [r["label"] for r in got.rows] == [1, 0]
    assert got.line_numbers == [2, 6]


def test_semicolon_csv_from_european_excel(tmp_path):
    """Read with commas it was one column 'text;label' ('no text field'), or '2 columns, but the header has 1'."""
    path = write(tmp_path / "d.csv", "\ufeffText;Label\nhallo, welt;1\ngut;0\n")
    got = load_examples(str(path), "classify")
    assert got.rows[0] == {"text": "hallo, welt", "text_pair": None, "label": 1}
    assert got.fields == {"text": "Text", "label": "Label"} and got.line_numbers == [2, 3]
    path = write(tmp_path / "c.csv", "text,label\nsee; also,1\nb,0\n")  # a comma header stays a comma file
    assert load_examples(str(path), "classify").rows[0]["text"] == "see; also"
    # its scores are written with a decimal comma: a regression target, not the string classes '0,5' and '4,25'
    path = write(tmp_path / "s.csv", "text;score\nmeh;2,5\ngreat;4,25\nbad;1\n")
    assert [r["label"] for r in load_examples(str(path), "classify").rows] == [2.5, 4.25, 1]
    path = write(tmp_path / "k.csv", "text,label\nmeh,\"2,5\"\n")  # a comma CSV's '2,5' is no number
    assert load_examples(str(path), "classify").rows[0]["label"] == "2,5"


def test_squad_article_without_paragraphs_is_named(tmp_path):
    """It made the whole file flat records: 'no question field ... (fields: paragraphs)'."""
    para = {"context": "Paris is in France.", "qas": [{"id": "q", "question": "Where?", "answers": []}]}
    for bad, why in (({"title": "x"}, "(it has none)"), (3, "(the article is a number)")):
        path = write(tmp_path / "squad.json", json.dumps({"data": [{"paragraphs": [para]}, bad]}))
        assert_has(error(str(path), "qa"), "squad.json:1:", "data[1].paragraphs must be a list", why)


def test_string_labels_are_stripped_in_json_as_in_csv(tmp_path):
    """'pos ' beside 'pos' was a third class in JSON (CSV cells were stripped)."""
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": "pos "}, {"text": "b", "label": "pos"},
                 {"text": "c", "label": " neg"})
    assert [r["label"] for r in load_examples(str(path), "classify").rows] == ["pos", "pos", "neg"]
    assert_has(error(str(jsonl(tmp_path / "e.jsonl", {"text": "a", "label": "  "})), "classify"),
               "e.jsonl:1:", "field 'label' is empty")


@pytest.mark.parametrize("user, assistant", [("Human", "GPT"), ("human", "chatgpt"), ("User", "Assistant"),
                                             ("user", "model"), ("user", "bot")])
def test_chat_role_names_of_other_formats(tmp_path, user, assistant):
    """ShareGPT's capitalised and 'chatgpt' turns, Gemma's 'model' and 'bot' were 'not one of system, user, ...'."""
    path = jsonl(tmp_path / "c.jsonl", {"conversations": [{"from": user, "value": "Hi"},
                                                          {"from": assistant, "value": "Hello!"}]})
    assert load_examples(str(path), "sft").rows == [{"messages": SFT_USER_ASSISTANT}]


def test_translate_source_and_target_must_be_two_fields(tmp_path):
    """--source-field en --target-field en trained a copier, and scored it perfect."""
    path = jsonl(tmp_path / "t.jsonl", {"en": "the dog", "es": "el perro"})
    assert_has(error(str(path), "translate", {"source": "en", "target": "en"}), "t.jsonl:1:",
               "the source and the target are one field 'en'", "--target-field")


def test_qa_answer_texts_without_offsets(tmp_path):
    """A list of answer strings, or {"text": [...]} without answer_start, is found in the context like one string
    answer is (they were 'each answer must be an object' and 'lists of the same length')."""
    ctx = "Ada Lovelace wrote the first program in 1843."
    path = jsonl(tmp_path / "q.jsonl", {"question": "Who?", "context": ctx, "answers": ["Lovelace", "Ada"]},
                 {"question": "When?", "context": ctx, "answers": {"text": ["1843"]}})
    assert [r["answers"] for r in load_examples(str(path), "qa").rows] == [
        {"text": ["Lovelace", "Ada"], "answer_start": [4, 0]}, {"text": ["1843"], "answer_start": [40]}]
    path = jsonl(tmp_path / "n.jsonl", {"question": "Who?", "context": ctx, "answers": ["Babbage"]})
    assert_has(error(str(path), "qa"), "n.jsonl:1:", "'Babbage' does not occur in the context")


def test_a_single_training_class_names_the_file():
    with pytest.raises(LmforgeError, match=r"^train\.csv: the training data has a single label 'pos'"):
        build_label_map(["pos", "pos"], source="train.csv")
