import fnmatch
import shutil

import pytest

from rerank_core import REGISTRY, ModelSourceError, load_encoder, registry, resolve_source
from rerank_core.registry import TOKENIZER_FILES, resolve_hub_id


def test_registry_names_map_to_qwen_ids():
    assert {n: s.hub_id for n, s in REGISTRY.items()} == {
        "qwen3-reranker-0.6b": "Qwen/Qwen3-Reranker-0.6B",
        "qwen3-reranker-4b": "Qwen/Qwen3-Reranker-4B",
        "qwen3-reranker-8b": "Qwen/Qwen3-Reranker-8B",
    }


def test_names_are_case_insensitive_and_hub_ids_pass_through():
    assert resolve_hub_id("Qwen3-Reranker-8B") == "Qwen/Qwen3-Reranker-8B"
    assert resolve_hub_id("someone/my-finetune") == "someone/my-finetune"
    assert resolve_hub_id("not a model") is None


def test_local_directory_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    calls = []
    assert resolve_source(str(tmp_path), downloader=lambda *a: calls.append(a)) == tmp_path
    assert calls == []


def test_directory_without_checkpoint_is_rejected(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_unknown_name_lists_known_ones():
    with pytest.raises(ModelSourceError) as info:
        resolve_source("qwen3-reranker-13b")
    message = str(info.value)
    assert "unknown model source 'qwen3-reranker-13b'" in message
    assert "qwen3-reranker-0.6b" in message and "qwen3-reranker-8b" in message


def test_download_goes_to_the_chosen_hub_and_cache(tmp_path):
    calls = []

    def fake(hub_id, hub, cache_dir, files):
        calls.append((hub_id, hub, cache_dir, files))
        return str(tmp_path)

    assert resolve_source("qwen3-reranker-4b", downloader=fake) == tmp_path
    assert resolve_source("Qwen/Qwen3-Reranker-8B", hub="huggingface", cache_dir="/c", downloader=fake)
    assert resolve_source("qwen3-reranker-0.6b", downloader=fake, files=["*.json"]) == tmp_path
    assert calls == [
        ("Qwen/Qwen3-Reranker-4B", "modelscope", None, None),
        ("Qwen/Qwen3-Reranker-8B", "huggingface", "/c", None),
        ("Qwen/Qwen3-Reranker-0.6B", "modelscope", None, ["*.json"]),
    ]


def test_hub_and_cache_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RERANK_HUB", "huggingface")
    monkeypatch.setenv("RERANK_CACHE_DIR", str(tmp_path))
    calls = []
    resolve_source("qwen3-reranker-0.6b", downloader=lambda *a: calls.append(a) or str(tmp_path))
    assert calls == [("Qwen/Qwen3-Reranker-0.6B", "huggingface", str(tmp_path), None)]


def test_unknown_hub_is_rejected():
    with pytest.raises(ModelSourceError, match="unknown hub 'github'"):
        resolve_source("qwen3-reranker-0.6b", hub="github", downloader=lambda *a: "/")


def test_offline_failure_says_which_id_which_hub_and_what_to_do():
    def offline(hub_id, hub, cache_dir, files):
        raise ConnectionError("Name or service not known")

    with pytest.raises(ModelSourceError) as info:
        resolve_source("qwen3-reranker-0.6b", downloader=offline)
    message = str(info.value)
    assert "'Qwen/Qwen3-Reranker-0.6B' from modelscope" in message
    assert "ConnectionError: Name or service not known" in message
    assert "--hub huggingface" in message and "--hub modelscope" not in message  # the other hub
    assert "--cache-dir DIR" in message and "local checkpoint directory" in message
    assert "rerank download" not in message  # never the download that just failed
    assert isinstance(info.value.__cause__, ConnectionError)


def test_a_wrapped_error_reports_its_root_cause_briefly():
    def offline(hub_id, hub, cache_dir, files):
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as e:
            raise RuntimeError("Connection failed: " + "x" * 500) from e

    with pytest.raises(ModelSourceError) as info:
        resolve_source("Qwen/Qwen3-Reranker-4B", hub="huggingface", downloader=offline)
    message = str(info.value)
    assert "caused by OSError: [Errno -2] Name or service not known" in message
    assert "x" * 200 not in message and "…" in message  # a long message is cut
    assert "--hub modelscope" in message


def test_tokenizer_only_load_fetches_no_weights(monkeypatch, tmp_path, tiny_checkpoint):
    """load_encoder (the ingress) asks the hub for config and tokenizer files only."""
    requested = []

    def hub(hub_id, hub_name, cache_dir, files):
        # A stand-in for the hub's snapshot_download(allow_patterns=files) serving tiny_checkpoint.
        requested.append(files)
        out = tmp_path / "snapshot"
        out.mkdir(exist_ok=True)
        for f in tiny_checkpoint.iterdir():
            if files is None or any(fnmatch.fnmatch(f.name, pattern) for pattern in files):
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(registry, "download", hub)
    encoder = load_encoder("qwen3-reranker-0.6b", 512)
    assert requested == [TOKENIZER_FILES]
    fetched = {f.name for f in (tmp_path / "snapshot").iterdir()}
    assert "tokenizer.json" in fetched and "config.json" in fetched
    assert not any(name.endswith((".safetensors", ".bin")) for name in fetched)
    assert any(f.name.endswith(".safetensors") for f in tiny_checkpoint.iterdir())
    assert len(encoder.encode("q", ["a document"]).documents) == 1
