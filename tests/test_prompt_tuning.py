"""Prompt tuning and the P-adapter at the ``input`` place (issue 12).

The shared invariants (base untouched, gradients only on the prompt, save / load, routing =
alone) run in ``test_invariants.py`` / ``test_checkpoint.py`` / ``test_composition.py`` through
``helpers.INPUT_METHODS``. Here: what only the input place has: outputs at the user's length,
``generate()`` with the key/value cache against recomputing, per-example prompts of different
lengths (and none) in one batch and in ``generate()``, initialisation, the user's own
``inputs_embeds`` / ``position_ids`` / ``token_type_ids``, speech encoders (P-adapter), bad input
and the CLI.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from adapterkit import AdapterError, AdapterModel, BatchSplit, Stack
from helpers import ARCHS, Snapshot, make_base, make_batch, perturb, run, total_hooks

DECODERS = ["gpt2", "llama"]
TEXT = ["bert", "distilbert", "gpt2", "llama", "t5", "bart"]


def prompted(arch_name: str, seq2seq_lm: bool = False, **options) -> AdapterModel:
    """A tiny model with prompts ``p`` (3 rows, active) and ``q`` (5 rows), moved off their init."""
    arch = ARCHS[arch_name]
    torch.manual_seed(0)
    base = T.AutoModelForSeq2SeqLM.from_config(arch.config()) if seq2seq_lm else make_base(arch)
    model = AdapterModel(base.eval())
    model.add_adapter("p", "prompt_tuning", prompt_length=3, **options)
    model.add_adapter("q", "prompt_tuning", prompt_length=5, **options)
    perturb(model.adapters, scale=2.0)
    model.set_active_adapters("p")
    return model.eval()


def bare_of(model: AdapterModel, batch: dict, **kwargs) -> torch.Tensor:
    with model.disable_adapters():
        return run(model, batch, **kwargs)


# -- the forward ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXT)
def test_outputs_keep_the_users_length_and_differ_from_the_bare_model(name):
    arch = ARCHS[name]
    model, batch = prompted(name), make_batch(arch=arch)
    out, bare = run(model, batch), bare_of(model, batch)
    assert out.shape == bare.shape
    assert (out - bare).abs().max() > 1e-3
    hidden = model(**batch, output_hidden_states=True)
    if arch.encoder_decoder:  # the decoder cross-attends to the prompt: the encoder's output keeps it
        assert hidden.encoder_last_hidden_state.shape[1] == 3 + 7
        assert all(h.shape[1] == 7 for h in hidden.decoder_hidden_states)
    else:
        assert len(hidden.hidden_states) == 5 and all(h.shape[1] == 7 for h in hidden.hidden_states)


@pytest.mark.parametrize("name", TEXT)
def test_routed_batch_with_prompts_of_two_lengths_and_none_equals_each_example_alone(name):
    arch = ARCHS[name]
    model, batch = prompted(name), make_batch(arch=arch)
    names = ["p", None, "q", "p"]
    routed = run(model, batch, adapter_names=names)
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        if n is None:
            alone = bare_of(model, row)
        else:
            model.set_active_adapters(n)
            alone = run(model, row)
        assert (routed[i] - alone[0]).abs().max() <= 1e-5, (i, n)
    model.set_active_adapters(None)
    assert total_hooks(model) == 0


def test_routed_heads_with_prompts_equal_each_adapter_and_head_alone():
    model, batch = prompted("bert"), make_batch()
    model.add_classification_head("p", num_labels=2)
    model.add_classification_head("q", num_labels=3)
    model.eval()
    names = ["p", None, "q", "p"]
    out = model(**batch, adapter_names=names, routed_heads=True)
    assert out.logits[1] is None and out.hidden_states.shape == (4, 7, 32)
    for i in (0, 2, 3):
        model.set_active_adapters(names[i])
        alone = model(**{k: v[i:i + 1] for k, v in batch.items()}).logits[0]
        assert (out.logits[i] - alone).abs().max() <= 1e-5


def test_causal_lm_loss_and_head_pooling_see_the_real_tokens_only():
    model, batch = prompted("gpt2"), make_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected)
    model.add_classification_head("p", num_labels=3)
    padded = run(model, batch)
    length = int(batch["attention_mask"][1].sum())
    alone = run(model, {k: v[1:2, :length] for k, v in batch.items()})
    assert (padded[1] - alone[0]).abs().max() <= 1e-5


def test_bert_pooler_reads_the_real_cls_token():
    model = prompted("bert")
    batch = make_batch()
    out = model(**batch)
    assert torch.allclose(out.pooler_output, model.model.pooler(out.last_hidden_state))


def test_users_inputs_embeds_position_ids_and_token_types_are_taken():
    model, batch = prompted("bert"), make_batch()
    embeds = model.model.embeddings.word_embeddings(batch["input_ids"])
    by_ids = run(model, batch)
    by_embeds = run(model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]})
    assert torch.equal(by_ids, by_embeds)
    positions = torch.arange(7)[None].expand(4, -1)
    types = torch.zeros_like(batch["input_ids"])
    assert torch.allclose(run(model, batch, position_ids=positions, token_type_ids=types), by_ids, atol=1e-6)
    types[:, 3:] = 1  # second segment: the token types reach the model, shifted with the input
    assert not torch.allclose(run(model, batch, token_type_ids=types), by_ids, atol=1e-3)


def test_stacked_prompts_prepend_both():
    """``Stack("p", "q")`` runs p, then q in front of it: one prompt ``[q, p]``."""
    model, batch = prompted("gpt2"), make_batch()
    model.set_active_adapters(Stack("p", "q"))
    both = run(model, batch)
    model.add_adapter("qp", "prompt_tuning", prompt_length=8, set_active=True)
    rows = [model.adapters[n]["input"].prompt_embedding.weight for n in ("q", "p")]
    with torch.no_grad():
        model.adapters["qp"]["input"].prompt_embedding.weight.copy_(torch.cat(rows))
    assert both.shape == (4, 7, 100)
    assert torch.allclose(both, run(model.eval(), batch), atol=1e-6)


# -- generate() with the key/value cache -----------------------------------------------------------
def _generate(model: AdapterModel, batch: dict, **kwargs):
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, 1)


def _prompt_batch(name: str) -> dict:
    batch = make_batch()
    if name in DECODERS:  # decoders generate from left-padded prompts
        batch["attention_mask"] = batch["attention_mask"].flip(1)
    return batch


@pytest.mark.parametrize("name", DECODERS + ["t5"])
def test_generate_with_cache_equals_recomputing_every_step(name):
    model = prompted(name, seq2seq_lm=name == "t5")
    batch = _prompt_batch(name)
    cached, cached_scores = _generate(model, batch, use_cache=True)
    again, again_scores = _generate(model, batch, use_cache=False)
    assert torch.equal(cached, again)
    assert (cached_scores - again_scores).abs().max() <= 1e-4
    with model.disable_adapters():
        _, bare_scores = _generate(model, batch)
    assert (cached_scores - bare_scores).abs().max() > 1e-2  # the prompt is there


@pytest.mark.parametrize("name", DECODERS + ["t5"])
def test_routed_generate_equals_each_prompt_alone(name):
    model = prompted(name, seq2seq_lm=name == "t5")
    batch = _prompt_batch(name)
    names = ["p", None, "q", "p"]
    routed, routed_scores = _generate(model, batch, adapter_names=names)
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        if n is None:
            with model.disable_adapters():
                alone, scores = _generate(model, row)
        else:
            model.set_active_adapters(n)
            alone, scores = _generate(model, row)
        assert torch.equal(routed[i, -5:], alone[0, -5:]), (i, n)
        assert (routed_scores[i] - scores[0]).abs().max() <= 1e-4, (i, n)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_routed_beam_search_follows_each_prompt(name):
    model, batch = prompted(name, seq2seq_lm=name == "t5"), _prompt_batch(name)
    names = ["p", None, "q", "p"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=2, output_scores=True,
              return_dict_in_generate=True)
    routed = model.generate(**batch, adapter_names=names, **kw)
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        model.set_active_adapters(n)
        alone = model.generate(**row, **kw)
        assert torch.equal(routed.sequences[i, -4:], alone.sequences[0, -4:]), (i, n)
        assert (routed.sequences_scores[i] - alone.sequences_scores[0]).abs() <= 1e-5, (i, n)


# -- initialisation --------------------------------------------------------------------------------
def test_from_vocab_rows_are_rows_of_the_embedding():
    model = AdapterModel(make_base(ARCHS["llama"]))
    model.add_adapter("v", "prompt_tuning", prompt_length=6, prompt_init="from_vocab")
    rows = model.adapters["v"]["input"].prompt_embedding.weight
    table = model.model.get_input_embeddings().weight
    assert all((table == row).all(-1).any() for row in rows)


def test_random_uniform_is_in_range_and_bart_vocab_rows_are_scaled():
    model = AdapterModel(make_base(ARCHS["bart"]))
    model.add_adapter("u", "prompt_tuning", prompt_length=50)
    rows = model.adapters["u"]["encoder-input"].prompt_embedding.weight
    assert rows.abs().max() <= 0.5 and rows.std() > 0.2


def test_from_string_embeds_the_text_with_the_models_tokenizer(tmp_path, monkeypatch):
    from trainkit import tiny_bert

    model = AdapterModel.from_pretrained(str(tiny_bert(tmp_path / "bert")))
    model.add_adapter("s", "prompt_tuning", prompt_length=5, prompt_init="from_string",
                      prompt_init_text="good film")
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "bert")
    ids = tok("good film", add_special_tokens=False)["input_ids"]
    expected = model.model.get_input_embeddings().weight[(ids * 3)[:5]]
    assert torch.equal(model.adapters["s"]["input"].prompt_embedding.weight, expected)
    model.save_adapter(tmp_path / "s", "s")  # loading needs no tokenizer: the saved rows replace the init
    again = AdapterModel(model.model)

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("loading must not need the tokenizer")

    monkeypatch.setattr("adapterkit.loader.load_tokenizer", no_tokenizer)
    name = again.load_adapter(tmp_path / "s")
    assert torch.equal(again.adapters[name]["input"].prompt_embedding.weight, expected)
    assert again.records[name].config.prompt_init == "from_string"


# -- speech: the P-adapter -------------------------------------------------------------------------
SPEECH = {
    "wav2vec2": T.Wav2Vec2Config, "hubert": T.HubertConfig, "wavlm": T.WavLMConfig,
}


def tiny_speech(kind: str, stable: bool) -> torch.nn.Module:
    config = SPEECH[kind](hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                          conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=2, do_stable_layer_norm=stable,
                          feat_extract_norm="layer" if stable else "group", vocab_size=12)
    torch.manual_seed(0)
    return T.AutoModel.from_config(config).eval()


@pytest.mark.parametrize("stable", [False, True], ids=["post-ln", "stable-ln"])
@pytest.mark.parametrize("kind", list(SPEECH))
def test_p_adapter_on_speech_encoders(kind, stable):
    model = AdapterModel(tiny_speech(kind, stable))
    model.add_adapter("p", "p_adapter", set_active=True)
    model.add_adapter("q", "p_adapter", prompt_length=7)
    assert model.records["p"].config.prompt_length == 20
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(3, 1600, generator=g)
    mask = torch.ones(3, 1600, dtype=torch.long)
    mask[1, 1200:] = 0
    batch = {"input_values": audio, "attention_mask": mask}
    out = model(**batch).last_hidden_state
    with model.disable_adapters():
        bare = model(**batch).last_hidden_state
    assert out.shape == bare.shape and (out - bare).abs().max() > 1e-3
    routed = model(**batch, adapter_names=["q", None, "p"]).last_hidden_state
    assert (routed[1] - bare[1]).abs().max() <= 1e-5
    assert (routed[2] - out[2]).abs().max() <= 1e-5
    model.set_active_adapters("q")
    assert (routed[0] - model(**batch).last_hidden_state[0]).abs().max() <= 1e-5
    model.train_adapter("p")
    model(**batch).last_hidden_state.pow(2).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["adapters.p.input.prompt_embedding.weight"]


def test_p_adapter_with_speech_init_from_the_vocabulary_is_refused():
    model = AdapterModel(tiny_speech("wav2vec2", False))
    with pytest.raises(AdapterError, match="speech features; use prompt_init='random_uniform'"):
        model.add_adapter("p", "p_adapter", prompt_init="from_vocab")
    assert list(model.adapters) == []


# -- bad input -------------------------------------------------------------------------------------
def test_a_model_without_token_embeddings_is_refused():
    vit = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                 image_size=8, patch_size=4))
    model = AdapterModel(vit)
    with pytest.raises(AdapterError, match="model type 'vit' has no input host .* takes no token embeddings"):
        model.add_adapter("p", "prompt_tuning")
    assert list(model.adapters) == [] and total_hooks(model) == 0


@pytest.mark.parametrize("options,message", [
    ({"prompt_length": 64}, r"prompt_length=64 leaves no room for the input: this gpt2 model has 64 positions"),
    ({"prompt_init": "from_string"}, r"prompt_init='from_string' needs prompt_init_text"),
    ({"prompt_init": "from_text"}, r"prompt_init='from_text' is unknown"),
    ({"layers": [0]}, r"Prompt tuning takes no layers"),
    ({"strategy": "gate"}, r"Prompt tuning takes no strategy"),
    ({"combine": "prefix_after_bos"}, r"combine='prefix_after_bos' is not supported"),
])
def test_bad_options_are_refused_and_leave_the_model_unchanged(options, message):
    model, batch = prompted("gpt2"), make_batch()
    before = Snapshot.of(model, batch)
    with pytest.raises(AdapterError, match=message):
        model.add_adapter("bad", "prompt_tuning", **options)
    before.assert_unchanged(model)


def test_prompt_plus_input_beyond_the_positions_is_refused():
    model = prompted("gpt2")  # 64 positions, prompt of 3
    ids = torch.randint(3, 100, (1, 62))
    with pytest.raises(AdapterError, match=r"need 65 positions, but this model has 64 .* Shorten the input to 61"):
        model(input_ids=ids)
    assert run(model, {"input_ids": ids[:, :61]}).shape == (1, 61, 100)


def test_prompt_in_the_decoder_stack_and_batch_split_are_refused():
    model, batch = prompted("t5"), make_batch(arch=ARCHS["t5"])
    with pytest.raises(AdapterError, match="the 'encoder' stack; drop stacks"):
        model.add_adapter("d", "prompt_tuning", stacks=["decoder"])
    model.set_active_adapters(BatchSplit("p", "q", batch_sizes=[2, 2]))
    with pytest.raises(AdapterError, match="compose only one after the other .* adapter_names"):
        run(model, batch)


def test_loading_a_prompt_into_another_family_is_refused(tmp_path):
    model = prompted("gpt2")
    model.save_adapter(tmp_path / "p", "p")
    other = AdapterModel(make_base(ARCHS["llama"]))
    with pytest.raises(Exception, match="gpt2|llama"):
        other.load_adapter(tmp_path / "p")
    assert list(other.adapters) == []


# -- PEFT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_peft_prompt_loads_and_exports_with_peft_s_exact_outputs(name, tmp_path):
    peft = pytest.importorskip("peft")
    arch, batch = ARCHS[name], make_batch()
    task = "CAUSAL_LM" if arch.causal_lm else "FEATURE_EXTRACTION"
    theirs = peft.get_peft_model(make_base(arch), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4))
    theirs.eval().save_pretrained(tmp_path / "peft")

    def main_output(out):
        return out.logits if arch.causal_lm else out.last_hidden_state

    reference = main_output(theirs(**batch))[:, 4:]  # PEFT returns the virtual tokens' positions too
    ours = AdapterModel(make_base(arch))
    loaded = ours.load_adapter(tmp_path / "peft", set_active=True)
    assert ours.records[loaded].config.prompt_length == 4
    mine = main_output(ours.eval()(**batch))
    assert torch.equal(mine, reference)
    assert (mine - bare_of(ours, batch)).abs().max() > 1e-3
    perturb(ours.adapters[loaded])  # export: PEFT runs our (moved) prompt to the same outputs
    mine = main_output(ours(**batch))
    ours.save_adapter(tmp_path / "export", loaded, format="peft")
    again = peft.PeftModel.from_pretrained(make_base(arch), tmp_path / "export").eval()
    assert torch.equal(main_output(again(**batch))[:, 4:], mine)


def test_peft_export_of_an_encoder_decoder_prompt_is_refused(tmp_path):
    model = prompted("t5")
    with pytest.raises(AdapterError, match="encoder-decoders: two prompts.*nothing was written"):
        model.save_adapter(tmp_path / "x", "p", format="peft")
    assert not (tmp_path / "x").exists()


# -- the command line ------------------------------------------------------------------------------
def test_cli_trains_prompt_tuning_on_a_classification_task(tmp_path):
    from adapterkit.cli import main
    from trainkit import sentiment_rows, tiny_bert, write_tsv

    tiny_bert(tmp_path / "bert")
    write_tsv(tmp_path / "train.tsv", sentiment_rows(32, seed=0))
    assert main(["train", "--model", str(tmp_path / "bert"), "--train", str(tmp_path / "train.tsv"), "--out",
                 str(tmp_path / "run"), "--method", "prompt_tuning", "-o", "prompt_length=4", "--max-length", "64", "--epochs", "1",
                 "--batch-size", "16", "--progress", "none"]) == 0
    model = AdapterModel.from_pretrained(str(tmp_path / "bert"))
    name = model.load_adapter(tmp_path / "run" / "adapter", set_active=True)
    assert model.records[name].config.method == "prompt_tuning"
    assert model(input_ids=torch.tensor([[2, 5, 6, 3]])).logits.shape == (1, 2)


def test_adapterhub_export_of_a_prompt_is_refused_naming_the_formats_that_hold_it(tmp_path):
    model = AdapterModel(T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2)))
    model.add_adapter("p", "prompt_tuning", prompt_length=3)
    with pytest.raises(AdapterError, match=r"does not write prompt_tuning adapters in AdapterHub's format.*"
                                           r"nothing was written.*format='adapterkit' or format='peft'"):
        model.save_adapter(tmp_path / "x", "p", format="adapterhub")
    assert not (tmp_path / "x").exists()
