"""The offline API end to end on tiny checkpoints: sampling, stops, logprobs, chat, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from factory import hf_greedy
from safetensors.torch import load_file, save_file

from pdray import LLM, SamplingParams
from pdray.engine.sequence import SequenceStatus
from pdray.models.dummy import preset_config
from pdray.models.llama import DecoderForCausalLM
from pdray.models.registry import resolve_architecture
from pdray.worker.batch import SampledToken

PROMPTS = [[5, 6, 7, 8, 9], [20, 21], [100, 200, 300, 17, 18, 19, 40, 41]]


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM(str(checkpoint("llama3")), device="cpu", dtype="float32", block_size=4)


def assert_no_leak(llm: LLM) -> None:
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
    assert not llm.engine.requests


def first_output(llm: LLM, prompt, params: SamplingParams):
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


MAX_STEPS = 100  # far more than these few-token requests need: more means a stuck engine


def step_until_output(engine, failure: str) -> list:
    """The first non-empty `engine.step()`; AssertionError naming `failure` after MAX_STEPS."""
    for _ in range(MAX_STEPS):
        if outputs := engine.step():
            return outputs
    raise AssertionError(f"{failure} in {MAX_STEPS} steps")


def test_text_prompt_and_single_prompt_forms(llm):
    text_out = llm.generate("hello world", SamplingParams(max_tokens=4), use_tqdm=False)
    ids = llm.get_tokenizer().encode("hello world")
    assert len(text_out) == 1 and text_out[0].prompt_token_ids == ids
    ids_out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(ids_out) == 1 and len(ids_out[0].outputs[0].token_ids) == 4
    assert_no_leak(llm)


def test_seeded_sampling_reproducible_and_batch_independent(llm, checkpoint):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    alone = first_output(llm, PROMPTS[0], params).token_ids
    mixed = [SamplingParams(temperature=1.0, max_tokens=12)] * 2 + [params]
    outs = llm.generate([PROMPTS[1], PROMPTS[2], PROMPTS[0]], mixed, use_tqdm=False)
    assert outs[2].outputs[0].token_ids == alone
    other = LLM(str(checkpoint("llama3")), device="cpu", dtype="float32", max_num_seqs=2)
    assert first_output(other, PROMPTS[0], params).token_ids == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12)
    assert first_output(llm, PROMPTS[0], different_seed).token_ids != alone
    assert_no_leak(llm)


def test_n_sequences(llm):
    out = llm.generate(PROMPTS[2], SamplingParams(n=3, seed=5, max_tokens=6), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_no_leak(llm)


def test_stop_string_spanning_tokens_truncates(llm):
    greedy = first_output(llm, PROMPTS[2], SamplingParams(temperature=0, max_tokens=10))
    tokenizer = llm.get_tokenizer()
    text_upto_3 = tokenizer.decode(greedy.token_ids[:3])
    text_upto_4 = tokenizer.decode(greedy.token_ids[:4])
    # A stop string made of the end of token 3 and the start of token 4.
    stop = text_upto_4[len(text_upto_3) - 1 : len(text_upto_3) + 1]
    start = greedy.text.find(stop)
    out = first_output(llm, PROMPTS[2], SamplingParams(temperature=0, max_tokens=10, stop=[stop]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == greedy.text[:start]
    keep = SamplingParams(temperature=0, max_tokens=10, stop=stop, include_stop_str_in_output=True)
    assert first_output(llm, PROMPTS[2], keep).text == greedy.text[: start + len(stop)]
    assert_no_leak(llm)


def test_stop_token_ids_and_min_tokens(llm):
    greedy = first_output(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=10)).token_ids
    stop_id = greedy[2]
    first_at = greedy.index(stop_id)
    out = first_output(
        llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id])
    )
    assert out.token_ids == greedy[: first_at + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    held_off = SamplingParams(
        temperature=0, max_tokens=10, stop_token_ids=[stop_id], min_tokens=first_at + 2
    )
    out = first_output(llm, PROMPTS[0], held_off)
    assert len(out.token_ids) >= first_at + 2
    assert stop_id not in out.token_ids[: first_at + 1]
    assert_no_leak(llm)


def test_eos_stops_unless_ignored(checkpoint):
    probe = LLM(str(checkpoint("qwen2")), device="cpu", dtype="float32")
    greedy = first_output(probe, PROMPTS[1], SamplingParams(temperature=0, max_tokens=10)).token_ids
    eos = greedy[3]
    llm = LLM(str(checkpoint("qwen2", eos_token_id=eos)), device="cpu", dtype="float32")
    out = first_output(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=10))
    assert out.token_ids == greedy[: greedy.index(eos) + 1] and out.finish_reason == "stop"
    ignored = first_output(
        llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    )
    assert ignored.token_ids == greedy and ignored.finish_reason == "length"


def test_logprobs_match_the_model(llm, checkpoint):
    out = first_output(llm, PROMPTS[2], SamplingParams(temperature=0, max_tokens=3, logprobs=3))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint("llama3"), dtype=torch.float32)
    ids = torch.tensor([PROMPTS[2] + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    assert len(out.logprobs) == 3
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(PROMPTS[2]) - 1 + step]
        top = torch.topk(row, 3)
        assert entry[token].rank == 1
        assert [entry[t].rank for t in top.indices.tolist()] == [1, 2, 3]
        for t, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert entry[t].logprob == pytest.approx(lp, abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True))
    )


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "hi there"}]
    out = llm.chat(messages, SamplingParams(max_tokens=3), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    batch = llm.chat(
        [messages, messages + [{"role": "assistant", "content": "yo"}]], use_tqdm=False
    )
    assert len(batch) == 2
    assert_no_leak(llm)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 50}, "logprobs"),
        ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_and_engine_keeps_working(checkpoint):
    llm = LLM(str(checkpoint("llama3")), device="cpu", dtype="float32", max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len is 32"):
        llm.generate([list(range(3, 40))], use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 384]], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    # A bad prompt in the middle of a batch rejects the batch and leaves nothing behind.
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 6], [-1], [7, 8]], use_tqdm=False)
    assert_no_leak(llm)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert (
        out.outputs[0].finish_reason == "length"
        and len(out.prompt_token_ids + out.outputs[0].token_ids) == 32
    )
    assert out.outputs[0].token_ids == hf_greedy(checkpoint("llama3"), [[5, 6, 7]], 29)[0]
    assert_no_leak(llm)


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=50))
    engine.add_request("b", PROMPTS[0], SamplingParams(max_tokens=50, n=2))
    for _ in range(3):
        engine.step()
    assert engine.num_free_blocks < engine.block_manager.num_blocks
    out = engine.abort_request("b")
    assert out.outputs[0].finish_reason == "abort"
    engine.abort_request("a")
    assert engine.abort_request("a") is None
    engine.step()
    assert_no_leak(llm)


def test_prefill_role_holds_blocks_until_released(checkpoint):
    llm = LLM(
        str(checkpoint("llama3")), device="cpu", dtype="float32", role="prefill", block_size=4
    )
    engine = llm.engine
    engine.add_request("p", PROMPTS[2], SamplingParams(temperature=0, max_tokens=5))
    [out] = step_until_output(engine, "the prefill engine gave no first token")
    assert out.finished and len(out.outputs[0].token_ids) == 1
    assert out.outputs[0].finish_reason is None  # continues on a decode engine
    seq = engine.requests["p"].seqs[0]
    assert seq.status is SequenceStatus.HELD
    assert engine.held_block_table("p") == seq.block_table
    assert len(seq.block_table) == 2  # the 8 prompt tokens' KV
    assert engine.num_free_blocks == engine.block_manager.num_blocks - 2
    engine.release("p")
    engine.release("p")
    assert_no_leak(llm)


def test_decode_role_hooks_continue_a_request(checkpoint):
    """KV computed by one engine, copied into blocks another reserved: decoding continues exactly."""
    path = str(checkpoint("llama3"))
    params = SamplingParams(temperature=0, max_tokens=6)
    expected = hf_greedy(path, [PROMPTS[2]], 6)[0]
    prefill = LLM(path, device="cpu", dtype="float32", role="prefill", block_size=4).engine
    decode = LLM(path, device="cpu", dtype="float32", role="mixed", block_size=4).engine
    prefill.add_request("r", PROMPTS[2], params)
    first = step_until_output(prefill, "the prefill engine gave no first token")
    [reservation] = decode.reserve_remote("r", PROMPTS[2], params)
    src = prefill.held_block_table("r")
    start = reservation.num_cached_tokens // 4
    for s, d in zip(src[start:], reservation.block_table[start:], strict=True):
        decode.runner.kv_cache[:, :, d] = prefill.runner.kv_cache[:, :, s]
    prefill.release("r")
    out = decode.admit_remote("r", [SampledToken(first[0].outputs[0].token_ids[0])])
    for _ in range(MAX_STEPS):
        if out.finished:
            break
        out = next((o for o in decode.step() if o.request_id == "r"), out)
    assert out.finished, f"decoding 6 tokens took more than {MAX_STEPS} steps"
    assert out.outputs[0].token_ids == expected
    assert decode.num_free_blocks == decode.block_manager.num_blocks
    assert prefill.num_free_blocks == prefill.block_manager.num_blocks


def test_llm_rejects_decode_role_and_unknown_args(checkpoint):
    with pytest.raises(ValueError, match="role='decode'"):
        LLM(str(checkpoint("llama3")), role="decode")
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(str(checkpoint("llama3")), max_num_seq=3)
    with pytest.raises(ValueError, match="`role`"):
        LLM(str(checkpoint("llama3")), role="both")


# -- loading errors ------------------------------------------------------------------------------


def copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama3"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model architecture.*GPTBigCode"):
        LLM(str(path))


def test_missing_and_corrupt_weights(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama3"), tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing weights: model\.layers\.1\.mlp\.gate_up_proj\.weight:1"
    ):
        LLM(str(path))
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors: unreadable or corrupt"):
        LLM(str(path))
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        LLM(str(path))


def test_wrong_shape_and_missing_shard(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama3"), tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(7,\)"):
        LLM(str(path))
    sharded = copy_checkpoint(checkpoint("llama3", num_shards=2), tmp_path / "s")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        LLM(str(sharded))


def test_missing_model_dir_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path))


# -- dummy presets -------------------------------------------------------------------------------


def test_dummy_presets():
    llm = LLM("dummy:tiny", device="cpu")
    out = llm.generate("hello", SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].text
    with pytest.raises(ValueError, match="unknown dummy preset"):
        LLM("dummy:gpt5")
    _, arch = resolve_architecture(preset_config("llama3-8b"))
    with torch.device("meta"):
        model = DecoderForCausalLM(arch)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == 8_030_261_248  # Llama-3-8B
