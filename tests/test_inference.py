"""One inference path: every command and the server give the same reason for the same (user, item, options)."""

import contextlib
import json
import math

import pytest

from fastapi.testclient import TestClient


@contextlib.contextmanager
def embedded_shapes(predictor):
    """The (rows, tokens) of every batch the predictor's language model embeds while the block runs."""
    seen: list[tuple[int, int]] = []
    embed = predictor.model.lm.get_input_embeddings()
    hook = embed.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        yield seen
    finally:
        hook.remove()


def test_generate_recommend_predictor_and_server_agree(tiny_run, tmp_path, capsys):
    from recreason.cli import main
    from recreason.config import GenerateConfig
    from recreason.inference import Predictor
    from recreason.serving.app import create_app
    from recreason.serving.service import ExplanationService

    run = tiny_run[0]
    options = ["--set", "generate.max_new_tokens=6", "--set", "generate.precision=fp32", "--quiet"]
    gen = GenerateConfig(max_new_tokens=6, precision="fp32")
    out = tmp_path / "generated.jsonl"
    assert main(["generate", "--run", str(run), "--max-records", "4", "--out", str(out), *options]) == 0
    assert "wrote 4 explanations" in capsys.readouterr().out
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [(g["user"], g["item"]) for g in generated]

    predictor = Predictor(run, gen)
    direct = predictor.explain(pairs)
    assert [g["generated"] for g in generated] == [e.generated for e in direct]
    assert [g["reason"] for g in generated] == [e.reason for e in direct]
    assert [g["flags"] for g in generated] == [e.flags for e in direct]

    user, item = pairs[0]
    assert main(["recommend", "--run", str(run), "--user", user, "-k", "1000", "--json", *options]) == 0
    recommended = {r["item_id"]: r for r in json.loads(capsys.readouterr().out)["recommendations"]}
    assert item in recommended  # a test item is not in the user's training history
    assert recommended[item]["reason"] == direct[0].reason and recommended[item]["generated"] == direct[0].generated

    service = ExplanationService(run, store_url=f"sqlite:///{tmp_path / 'serving.db'}", gen_cfg=gen)
    try:
        client = TestClient(create_app(service))
        r = client.post("/v1/explanations", json={"items": [{"user_id": u, "item_id": i} for u, i in pairs]})
        assert r.status_code == 200, r.text
        served = r.json()["explanations"]
        assert [e["reason"] for e in served] == [e.reason for e in direct]
        assert [e["flags"] for e in served] == [e.flags for e in direct]
        assert [e["predicted_rating"] for e in served] == [e.predicted_rating for e in direct]
        r = client.post("/v1/recommendations", json={"user_id": user, "k": 5})
        assert [x["item_id"] for x in r.json()["recommendations"]] == list(recommended)[:5]
    finally:
        service.close()


def test_a_continuous_prompt_run_gets_the_bare_instruction_only_for_users_it_knows():
    from recreason.prompts.discrete import uses_soft_prompt

    assert uses_soft_prompt("continuous", True) and not uses_soft_prompt("continuous", False)
    assert not uses_soft_prompt("hybrid", True) and not uses_soft_prompt("discrete", True)


def test_selection_score_is_the_documented_sum():
    import collections
    import math

    from recreason.config import GenerateConfig
    from recreason.generation.generate import Candidate
    from recreason.inference.selection import candidate_score, choose, sentence_key
    from recreason.text import FeatureMatcher

    cfg = GenerateConfig(weight_likelihood=1.0, weight_grounded=0.5, weight_ungrounded=1.0, weight_user=0.5,
                         weight_generic=0.5)
    matcher = FeatureMatcher(["tone", "strings", "price", "cable"])
    generic = collections.Counter({sentence_key("This is a great product."): 7})
    plain = Candidate("This is a great product.", -0.5, True)
    specific = Candidate("The tone and the strings are great for the price.", -1.2, False)
    wrong = Candidate("The cable is great.", -0.4, False)
    item, user = {"tone", "strings", "price"}, {"tone"}
    assert candidate_score(plain, item, user, generic, cfg, matcher) == pytest.approx(-0.5 - 0.5 * math.log(8))
    assert candidate_score(specific, item, user, generic, cfg, matcher) == pytest.approx(-1.2 + 0.5 * 2 + 0.5)
    assert candidate_score(wrong, item, user, generic, cfg, matcher) == pytest.approx(-0.4 - 1.0)
    assert choose([plain, specific, wrong], item, user, generic, cfg, matcher) is specific
    only_likelihood = GenerateConfig(weight_grounded=0, weight_ungrounded=0, weight_user=0, weight_generic=0)
    assert choose([plain, specific, wrong], item, user, generic, only_likelihood, matcher) is wrong
    assert choose([Candidate("", 0.0, True), plain], item, user, generic, cfg, matcher) is plain
    # a vocabulary entry made only of function words ("to", by tagging error) counts neither way
    tagged = FeatureMatcher(["tone", "to"])
    easy = Candidate("Easy to play, good tone.", -1.0, False)
    assert candidate_score(easy, {"tone"}, set(), generic, cfg, tagged) == pytest.approx(-1.0 + 0.5 * 1)


def test_consensus_is_the_mean_rouge_l_f1_against_the_other_draws():
    import collections

    from recreason.config import GenerateConfig
    from recreason.generation.generate import Candidate
    from recreason.inference.selection import choose, consensus
    from recreason.text import FeatureMatcher

    a = Candidate("The tone is great.", -1.0, True, count=2)  # drawn twice
    b = Candidate("The tone is bright.", -0.8, False)
    c = Candidate("Great price.", -0.5, False)
    # tokens keep the full stop: a = the tone is great . (5), b = the tone is bright . (5), c = great price . (3)
    # LCS F1 (beta 1): a-b 2*4/10 = 0.8, a-c 2*2/8 = 0.5, b-c 2*1/8 = 0.25; 4 draws, so 3 others for each
    assert consensus([a, b, c]) == pytest.approx([(1 + 0.8 + 0.5) / 3, (2 * 0.8 + 0.25) / 3, (2 * 0.5 + 0.25) / 3])
    assert consensus([Candidate("Only one.", -1.0, True)]) == [0.0]
    matcher, generic = FeatureMatcher(["tone", "price"]), collections.Counter()
    plain = dict(weight_grounded=0, weight_ungrounded=0, weight_user=0, weight_generic=0)
    assert choose([a, b, c], {"tone", "price"}, set(), generic, GenerateConfig(**plain), matcher) is c
    # -1.0 + 2 * 0.767 = 0.533 beats -0.8 + 2 * 0.617 = 0.433 and -0.5 + 2 * 0.417 = 0.333
    assert choose([a, b, c], {"tone", "price"}, set(), generic, GenerateConfig(**plain, weight_consensus=2.0),
                  matcher) is a


def test_bleu_consensus_is_the_mean_smoothed_sentence_bleu_against_the_other_draws():
    import collections

    from recreason.config import GenerateConfig
    from recreason.generation.generate import Candidate
    from recreason.inference.selection import agreements, choose, consensus
    from recreason.text import FeatureMatcher, sentence_bleu, tokenize

    great, bright, short = "The tone is great.", "The tone is bright.", "Great tone."
    # great vs bright (5 tokens each): unigrams 4/5; bigrams 2/4 -> (2+1)/(4+1); trigrams 1/3 -> 2/4;
    # 4-grams 0/2 -> 1/3; same length, no brevity penalty
    assert sentence_bleu(tokenize(great), tokenize(bright)) == pytest.approx((4 / 5 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25)
    # "great tone ." against great (5 tokens): unigrams 3/3; bigrams 0/2 -> 1/3; trigrams 0/1 -> 1/2; no 4-gram
    # to count -> (0+1)/(0+1); brevity exp(1 - 5/3)
    hand = (1 * 1 / 3 * 1 / 2 * 1) ** 0.25 * math.exp(1 - 5 / 3)
    assert sentence_bleu(tokenize(great), tokenize(short)) == pytest.approx(hand)
    assert sentence_bleu(tokenize(great), tokenize(great)) == pytest.approx(1.0)
    assert sentence_bleu(tokenize(great), tokenize("Cheap strings")) == 0.0  # no word in common
    # the other way round, short is the reference: unigrams 3/5 of great's, bigrams 0/4 -> 1/5, trigrams 1/4,
    # 4-grams 1/3; great is longer, so no brevity penalty: BLEU is not symmetric
    reverse = (3 / 5 * 1 / 5 * 1 / 4 * 1 / 3) ** 0.25
    assert sentence_bleu(tokenize(short), tokenize(great)) == pytest.approx(reverse)
    a = Candidate(great, -1.0, True, count=2)
    b = Candidate(bright, -0.8, False)
    c = Candidate(short, -0.5, False)
    ab = (4 / 5 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25
    # short against bright: unigrams tone . = 2/3, bigrams 0/2 -> 1/3, trigrams 0/1 -> 1/2, brevity as above
    cb = (2 / 3 * 1 / 3 * 1 / 2) ** 0.25 * math.exp(1 - 5 / 3)
    # bright against short: unigrams 2/5, bigrams 0/4 -> 1/5, trigrams 0/3 -> 1/4, 4-grams 0/2 -> 1/3
    bc = (2 / 5 * 1 / 5 * 1 / 4 * 1 / 3) ** 0.25
    # each candidate is the hypothesis, every other draw its reference; a's second copy agrees fully
    assert consensus([a, b, c], "bleu") == pytest.approx([(1 + ab + reverse) / 3, (2 * ab + bc) / 3,
                                                           (2 * hand + cb) / 3])
    assert agreements([a, b, c]) == list(zip(consensus([a, b, c]), consensus([a, b, c], "bleu")))
    with pytest.raises(ValueError, match="unknown consensus utility"):
        consensus([a, b], "meteor")
    matcher, generic = FeatureMatcher(["tone"]), collections.Counter()
    plain = dict(weight_grounded=0, weight_ungrounded=0, weight_user=0, weight_generic=0)
    assert choose([a, b, c], {"tone"}, set(), generic, GenerateConfig(**plain), matcher) is c
    # with weight 2: a -1.0 + 2 * 0.616 = 0.232 beats b -0.8 + 2 * 0.450 = 0.100 and c -0.5 + 2 * 0.318 = 0.135
    assert choose([a, b, c], {"tone"}, set(), generic, GenerateConfig(**plain, weight_consensus_bleu=2.0),
                  matcher) is a


def test_length_term_counts_tokens_up_to_the_cap():
    import collections

    from recreason.config import GenerateConfig
    from recreason.generation.generate import Candidate
    from recreason.inference.selection import LENGTH_CAP, candidate_terms, choose
    from recreason.text import FeatureMatcher

    matcher, generic = FeatureMatcher(["tone"]), collections.Counter()
    short = Candidate("Great tone.", -0.5, True)  # great tone . = 3 tokens
    long = Candidate("The tone is warm and bright, like my old set.", -1.0, False)  # 12 tokens with , and .
    rambling = Candidate(" ".join(["very"] * 30) + " good.", -2.0, False)  # 32 tokens, 20 count
    assert [candidate_terms(c, {"tone"}, set(), generic, matcher)[-1] for c in (short, long, rambling)] == [3, 12, 20]
    assert LENGTH_CAP == 20
    plain = dict(weight_grounded=0, weight_ungrounded=0, weight_user=0, weight_generic=0)
    assert choose([short, long], {"tone"}, set(), generic, GenerateConfig(**plain), matcher) is short
    # -0.5 + 0.1 * 3 = -0.2 against -1.0 + 0.1 * 12 = 0.2: the longer reason wins
    assert choose([short, long], {"tone"}, set(), generic, GenerateConfig(**plain, weight_length=0.1), matcher) is long
    # -1.0 + 0.1 * 12 = 0.2 against -2.0 + 0.1 * 20 = 0.0: tokens past the cap earn nothing
    assert choose([long, rambling], {"tone"}, set(), generic, GenerateConfig(**plain, weight_length=0.1),
                  matcher) is long


def test_candidates_do_not_depend_on_the_batch_and_start_with_the_greedy_text(tiny_run):
    from recreason.config import GenerateConfig
    from recreason.generation.generate import generate_candidates, generate_texts, merge_candidates
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=6, precision="fp32"))
    records = predictor.dataset.subset(1, "test")[:5]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    cfg = GenerateConfig(max_new_tokens=6, precision="fp32", candidates=4, batch_size=5)
    together = generate_candidates(predictor.model, predictor.tokenizer, prompts, cfg, progress=False)
    alone = generate_candidates(predictor.model, predictor.tokenizer, prompts[-1:], cfg, progress=False)
    assert [c.text for c in together[-1]] == [c.text for c in alone[0]]
    assert [c.logprob for c in together[-1]] == pytest.approx([c.logprob for c in alone[0]], abs=1e-4)
    greedy = generate_texts(predictor.model, predictor.tokenizer, prompts, GenerateConfig(max_new_tokens=6),
                            progress=False)
    assert [c[0].text for c in together] == greedy and all(c[0].greedy for c in together)
    assert sum(len(c) for c in together) > len(prompts)  # the samples add texts the greedy pass did not write
    assert all(c.logprob <= 0 for cands in together for c in cands)
    assert [sum(c.count for c in cands) for cands in together] == [4] * len(prompts)  # every draw counted once
    # draws 2-3 decoded later and merged into draws 0-1 are the four candidates of one decode
    first = generate_candidates(predictor.model, predictor.tokenizer, prompts, cfg, progress=False, draws=range(2))
    later = generate_candidates(predictor.model, predictor.tokenizer, prompts, cfg, progress=False, draws=[2, 3])
    merged = [merge_candidates(a, b) for a, b in zip(first, later)]
    assert [[(c.text, c.greedy, c.count) for c in cands] for cands in merged] == \
        [[(c.text, c.greedy, c.count) for c in cands] for cands in together]
    assert not any(c.greedy for cands in later for c in cands)


def test_one_prefill_per_prompt_gives_the_candidates_of_a_prefill_per_draw(tiny_run):
    """The shared prefill runs the prompt through the model once for all of its draws (not once per draw) and
    decodes the same candidates, with the same likelihoods, as recomputing the prompt for every draw."""
    from recreason.config import GenerateConfig
    from recreason.generation.generate import generate_candidates
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=6, precision="fp32"))
    records = predictor.dataset.subset(1, "test")[:5]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    cfg = GenerateConfig(max_new_tokens=6, precision="fp32", candidates=4, batch_size=3)
    with embedded_shapes(predictor) as rows_seen:
        shared = generate_candidates(predictor.model, predictor.tokenizer, prompts, cfg, progress=False)
        prompt_passes = [shape for shape in rows_seen if shape[1] > 1]
        rows_seen.clear()
        each = generate_candidates(predictor.model, predictor.tokenizer, prompts, cfg, progress=False,
                                   shared_prefill=False)
        baseline_passes = [shape for shape in rows_seen if shape[1] > 1]
    # two batches of prompts: their shared header (the chat template's system turn) once, then each prompt's own part
    assert [rows for rows, _ in prompt_passes] == [1, 3, 1, 2]
    assert prompt_passes[0][1] == prompt_passes[2][1] >= 8
    assert [rows for rows, _ in baseline_passes] == [12, 8]  # the same batches, each prompt four times
    assert [[(c.text, c.greedy, c.count) for c in cands] for cands in shared] == \
        [[(c.text, c.greedy, c.count) for c in cands] for cands in each]
    assert [c.logprob for cands in shared for c in cands] == \
        pytest.approx([c.logprob for cands in each for c in cands], abs=1e-4)


def test_the_shared_header_is_computed_once_and_changes_no_reason(tiny_run):
    """Greedy batches compute the prompts' common header once (the chat template's system turn, the user's part when
    one user's items are explained together) and write exactly the reasons of each prompt decoded alone."""
    import torch

    from recreason.config import GenerateConfig
    from recreason.generation.generate import generate_texts, shared_header
    from recreason.inference import Predictor, Request

    batch = {"input_ids": torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 9, 9, 9], [0, 5, 6, 7, 8, 1]]),
             "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])}
    assert shared_header(batch) == 3  # 5 6 7, whatever the padding
    same = {"input_ids": torch.tensor([[5, 6, 7], [5, 6, 7]]), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    assert shared_header(same) == 2  # each prompt keeps its last token to start decoding from
    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=6, precision="fp32"))
    records = predictor.dataset.subset(1, "test")[:6]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    cfg = GenerateConfig(max_new_tokens=8, batch_size=6, precision="fp32")
    with embedded_shapes(predictor) as rows_seen:
        together = generate_texts(predictor.model, predictor.tokenizer, prompts, cfg, progress=False)
    header, own = rows_seen[0], rows_seen[1]
    longest = max(len(predictor.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert header[0] == 1 and header[1] >= 8 and own == (6, longest - header[1] - 1)
    alone = [generate_texts(predictor.model, predictor.tokenizer, [p], cfg, progress=False)[0] for p in prompts]
    assert together == alone


def test_length_groups_is_the_cheapest_split_of_the_sorted_rows():
    import itertools
    import random

    from recreason.generation.generate import length_groups

    def cost(groups, lengths, call):
        return sum(len(g) * max(lengths[r] for r in g) + call for g in groups)

    assert length_groups([50, 52, 51, 49], call_tokens=96) == [[3, 0, 2, 1]]  # close lengths: one call
    assert length_groups([10, 200, 12, 190], call_tokens=16) == [[0, 2], [3, 1]]
    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 8))]
        call = rng.choice([0, 8, 40])
        groups = length_groups(lengths, call)
        assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda r: (lengths[r], r))
        best = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))], lengths, call)
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(groups, lengths, call) == best


def test_prompts_of_unlike_lengths_prefill_in_groups_and_change_no_candidate(tiny_run):
    """A batch mixing short and long prompts prefills them in groups of similar length, each padded to its own
    longest, and every prompt gets the candidates and likelihoods it gets decoded alone."""
    from recreason.config import GenerateConfig
    from recreason.generation.generate import generate_candidates
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=6, precision="fp32"))
    records = predictor.dataset.subset(1, "test")[:4]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    prompts = [p if k % 2 else p + " and more words" * (40 + k) for k, p in enumerate(prompts)]
    lengths = [len(predictor.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    cfg = GenerateConfig(max_new_tokens=6, precision="fp32", candidates=3, batch_size=4)
    with embedded_shapes(predictor) as rows_seen:
        together = generate_candidates(predictor.model, predictor.tokenizer, prompts, cfg, progress=False)
    passes = [shape for shape in rows_seen if shape[1] > 1]
    header = passes[0][1]
    assert passes[0][0] == 1
    own = sorted(passes[1:])
    assert own == sorted([(2, max(lengths[0], lengths[2]) - header - 1), (2, max(lengths[1], lengths[3]) - header - 1)])
    alone = [generate_candidates(predictor.model, predictor.tokenizer, [p], cfg, progress=False)[0] for p in prompts]
    assert [[(c.text, c.count) for c in cands] for cands in together] == \
        [[(c.text, c.count) for c in cands] for cands in alone]
    assert [c.logprob for cands in together for c in cands] == \
        pytest.approx([c.logprob for cands in alone for c in cands], abs=1e-4)


def test_candidate_selection_runs_in_every_path(tiny_run, tmp_path):
    """With generate.candidates > 1 the Predictor chooses among candidates; the choice is one of them."""
    from recreason.config import GenerateConfig
    from recreason.generation.generate import generate_candidates
    from recreason.inference import Predictor, Request

    cfg = GenerateConfig(max_new_tokens=6, precision="fp32", candidates=3, generic_records=8)
    predictor = Predictor(tiny_run[0], cfg)
    records = predictor.dataset.subset(1, "test")[:4]
    chosen = predictor.explain_records(records)
    prompted = [predictor.prompt(Request(r.user, r.item, record=r)) for r in records]
    options = generate_candidates(predictor.model, predictor.tokenizer, [p.prompt for p in prompted], cfg,
                                  progress=False)
    assert all(text in [c.text for c in cands] for text, cands in zip(chosen, options))
    table = json.loads((tiny_run[0] / "generated" / "generic-table.json").read_text())
    assert 0 < sum(table["counts"].values()) <= 8  # greedy reasons of 8 validation records (blank ones left out)


def test_nucleus_from_the_top_k_tokens_is_the_nucleus_of_a_full_sort():
    import torch

    from recreason.generation.generate import nucleus_drop

    # hand-worked: probabilities 0.5, 0.3, 0.15, 0.05; top_p 0.75 keeps 0.5 and 0.3 (mass before 0.3 is 0.5 <=
    # 0.75) and 0.15 (mass before it 0.8 > 0.75 is dropped): kept {0, 1}
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    assert nucleus_drop(logits, 0.75).tolist() == [[False, False, True, True], [True, True, False, False]]
    assert nucleus_drop(logits, 0.85, k=2).tolist() == [[False, False, False, True], [True, False, False, False]]

    def by_sort(x, top_p):
        probs, order = torch.softmax(x, -1).sort(dim=-1, descending=True, stable=True)
        return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, probs.cumsum(-1) - probs > top_p)

    torch.manual_seed(0)
    straddled = 0
    for scale in (0.5, 3.0, 10.0):  # flat rows overrun k and fall back to the sort; bf16 scores tie often
        x = (torch.randn(32, 3000) * scale).to(torch.bfloat16).float()
        for top_p in (0.5, 0.95):
            drop, reference = nucleus_drop(x, top_p, k=32), by_sort(x, top_p)
            assert torch.equal(drop, reference)
            assert torch.equal(nucleus_drop(x, top_p), reference)  # the top 64, then the top 1,024, then the sort
            probs = torch.softmax(x, -1)  # rows whose nucleus ends inside a run of equal probabilities
            last = probs.masked_fill(reference, 2.0).min(-1, keepdim=True).values
            straddled += int(((probs == last) & reference).any(-1).sum())
    assert straddled > 10  # the tie rule was exercised, not only the sort


def test_seeded_samples_are_gumbel_max_over_the_whole_nucleus():
    """SeededSampler adds noise only where the nucleus keeps a token; its samples are the Gumbel-max samples with
    a row's noise for every token (the counter stream's hash of seed, step and token; or a torch generator advancing
    by the vocabulary each step), banned tokens never."""
    import torch

    from recreason.generation.generate import SeededSampler, counter_uniform, nucleus_drop

    seeds, vocab, temperature, top_p = [None, 11, 12, 13], 500, 0.8, 0.9
    for stream in ("counter", "mt19937"):
        torch.manual_seed(0)
        sampler = SeededSampler(seeds, temperature, top_p, stream=stream)
        generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        ids = torch.zeros(len(seeds), 3, dtype=torch.long)
        picked = set()
        for step in range(20):
            scores = (torch.randn(len(seeds), vocab) * 2).to(torch.bfloat16).float()  # ties, as bf16 scores have
            scores[:, :5] = float("-inf")  # banned by an earlier processor
            expected = []
            for row, seed in enumerate(seeds):
                if seed is None:
                    expected.append(int(scores[row].argmax()))
                    continue
                x = scores[row : row + 1] / temperature
                x = x.masked_fill(nucleus_drop(x, top_p), float("-inf"))
                u = (counter_uniform(seed, step, torch.arange(vocab)) if stream == "counter"
                     else torch.rand(vocab, generator=generators[row])).clamp_(1e-10, 1 - 1e-10)
                expected.append(int((x - torch.log(-torch.log(u))).argmax()))
            chosen = sampler(ids, scores.clone()).argmax(-1).tolist()
            assert chosen == expected and min(chosen) >= 5
            picked.update(chosen[1:])
        assert len(picked) > 20  # samples, not the argmax every time


def test_the_counter_stream_samples_the_nucleus_distribution():
    """The counter stream's samples follow the tempered nucleus probabilities: 4,000 seeds' first step and one
    seed's 4,000 steps both land on each token about as often as its probability says (within 4.5 standard
    errors), and its numbers are uniform in (0, 1), never 0 or 1."""
    import torch

    from recreason.generation.generate import SeededSampler, counter_uniform, nucleus_drop

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0]])
    temperature, top_p, n = 0.8, 0.95, 4000
    tempered = logits / temperature
    probs = torch.softmax(tempered.masked_fill(nucleus_drop(tempered, top_p), float("-inf")), -1)[0]
    assert 0 < int((probs > 0).sum()) < logits.shape[1]  # the nucleus cuts the tail: the cut is tested too

    def check(tokens: list[int]) -> None:
        counts = torch.bincount(torch.tensor(tokens), minlength=logits.shape[1]).double()
        error = (probs.double() * (1 - probs.double()) / n).sqrt()
        assert bool((counts / n - probs.double()).abs().le(4.5 * error + 1e-12).all()), (counts / n, probs)

    across_seeds = SeededSampler(list(range(1, n + 1)), temperature, top_p, stream="counter")
    check(across_seeds.pick(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone()).tolist())
    one_seed = SeededSampler([5], temperature, top_p, stream="counter")
    check([int(one_seed.pick(torch.zeros(1, 1, dtype=torch.long), logits.clone())) for _ in range(n)])

    u = torch.cat([counter_uniform(seed, step, torch.arange(2000)) for seed in (0, 1, 2**40 + 1) for step in (0, 7)])
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert len(torch.unique(u)) > 0.99 * len(u)  # seeds, steps and tokens give different numbers


def test_sampler_pick_is_the_argmax_of_its_perturbed_scores():
    """SeededSampler.pick (the decoding loop's path: the nucleus read off the top tokens) chooses what the argmax of
    its whole-vocabulary scores chooses, with ties at the nucleus' edge, nuclei past the top tokens, banned tokens,
    greedy rows and rows that ended; both samplers' streams advance alike, with either random stream."""
    import itertools

    import torch

    from recreason.generation import generate as g

    torch.manual_seed(0)
    vocab, rows = 700, 12
    seeds = [None] + [100 + n for n in range(rows - 1)]
    fallbacks = resolved = 0
    cases = ((0.8, 0.95, 2.0), (1.0, 0.5, 6.0), (0.7, 0.999, 0.3), (1.2, 1.0, 2.0))
    for (temperature, top_p, scale), stream in itertools.product(cases, ("counter", "mt19937")):
        whole, picking = (g.SeededSampler(seeds, temperature, top_p, eos_token_id=3, stream=stream) for _ in range(2))
        ids = torch.zeros(rows, 1, dtype=torch.long)
        for step in range(12):
            scores = (torch.randn(rows, vocab) * scale).to(torch.bfloat16).float()  # bf16 scores tie often
            scores[:, 5:9] = float("-inf")  # banned by an earlier processor
            scores[step % rows, 40:400] = scores[step % rows, 40]  # a long run of equal scores
            expected = whole(ids, scores.clone()).argmax(-1)
            assert torch.equal(picking.pick(ids, scores.clone()), expected)
            if top_p < 1.0:
                _, _, inside = g._nucleus_in_top(scores / temperature, top_p, g.PICK_TOP)
                resolved, fallbacks = resolved + int(inside.sum()), fallbacks + int((~inside).sum())
            ids = torch.cat([ids, expected[:, None]], 1)
            ids[step % 5, -1] = 3  # that row wrote the end token: it is no longer sampled
    assert resolved > 50 and fallbacks > 10  # both paths ran

    # the nucleus read off the top tokens is nucleus_drop's wherever it says it resolved a row; a tie at the edge
    # keeps its first tokens by id, and a tie reaching past the top tokens is left to the whole row
    edge = torch.full((3, vocab), -30.0)
    edge[0, 50], edge[0, [44, 10, 30]] = 0.0, float(torch.log(torch.tensor(0.4)))  # 0.5, then 0.2 x 3 tied
    edge[1, 7], edge[1, 100:200] = 0.0, float(torch.log(torch.tensor(0.01)))  # 0.5, then 0.005 x 100 tied
    edge[2] = torch.randn(vocab) * 3
    kept, index, inside = g._nucleus_in_top(edge, 0.75, g.PICK_TOP)
    expected = ~g.nucleus_drop(edge, 0.75)
    assert inside.tolist() == [True, False, True]
    assert sorted(index[0][kept[0]].tolist()) == [10, 30, 50] and expected[0].nonzero().squeeze(-1).tolist() == [10, 30, 50]
    for row in (0, 2):
        assert sorted(index[row][kept[row]].tolist()) == expected[row].nonzero().squeeze(-1).tolist()


def test_no_repeat_bans_only_the_reasons_own_ngrams():
    """generate.no_repeat_ngram bans a token that would complete an n-gram the reason already wrote; the prompt's
    n-grams stay allowed (a reason may name the features its prompt lists)."""
    import torch

    from recreason.generation.generate import NoRepeatInReason

    ban = NoRepeatInReason(2)
    reasons = torch.tensor([[9, 9, 4], [9, 9, 4]])  # both prompts hold "9 9" and "9 4"

    def banned_after(*tokens: list[int]) -> list[list[int]]:
        nonlocal reasons
        reasons = torch.cat([reasons, torch.tensor(tokens).T], 1) if tokens else reasons
        scores = ban(reasons, torch.zeros(2, 12))
        return [torch.isinf(row).nonzero().flatten().tolist() for row in scores]

    assert banned_after() == [[], []]  # the prompts only: their first call marks where the reasons start
    assert banned_after([9, 1]) == [[], []]  # "9" again would repeat the prompt's "9 9": allowed
    assert banned_after([4, 2]) == [[], []]  # reasons "9 4" and "1 2"
    assert banned_after([9, 1]) == [[4], [2]]  # "9 4 9" may not go on with 4, "1 2 1" not with 2
    assert banned_after([5, 3]) == [[], []]
    assert banned_after([9, 1]) == [[4, 5], [2, 3]]  # "9 4 9 5 9": neither "9 4" nor "9 5" again; "1 2 1 3 1"


def test_greedy_reasons_with_no_repeat_hold_no_repeated_ngram(tiny_run):
    """Decoded through generate_texts' kwargs, the tiny model's greedy tokens, which loop without the ban, hold
    no repeated bigram with it."""
    from recreason.config import GenerateConfig
    from recreason.generation.generate import _decode_kwargs
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=6, precision="fp32"))
    tok = predictor.tokenizer
    records = predictor.dataset.subset(1, "test")[:6]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    tok.padding_side = "left"
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")

    def bigrams(no_repeat: int) -> list[list[tuple[int, int]]]:
        cfg = GenerateConfig(max_new_tokens=24, precision="fp32", no_repeat_ngram=no_repeat)
        new = predictor.model.generate(batch["input_ids"], batch["attention_mask"], **_decode_kwargs(cfg, tok))
        rows = [[t for t in row if t not in (tok.pad_token_id, tok.eos_token_id)] for row in new.tolist()]
        return [list(zip(row, row[1:])) for row in rows]

    assert any(len(set(row)) < len(row) for row in bigrams(0))  # the plain greedy reasons loop
    assert all(len(set(row)) == len(row) for row in bigrams(2))


def test_min_length_bans_the_stops_until_the_reason_is_long_enough():
    """generate.min_new_tokens: the stop tokens (end of text, line breaks) are banned for the reason's first n
    tokens, counted from where the reason starts, and allowed from then on; other tokens never are."""
    import torch

    from recreason.generation.generate import MinReasonLength

    hold = MinReasonLength(2, [0, 3])
    prompts = torch.tensor([[5, 6, 7], [8, 5, 6]])
    banned = lambda ids: [torch.isinf(row).nonzero().flatten().tolist() for row in hold(ids, torch.zeros(2, 6))]
    assert banned(prompts) == [[0, 3], [0, 3]]  # nothing written yet
    assert banned(torch.cat([prompts, torch.tensor([[1], [2]])], 1)) == [[0, 3], [0, 3]]  # one token written
    assert banned(torch.cat([prompts, torch.tensor([[1, 4], [2, 2]])], 1)) == [[], []]  # two: may end now
    with pytest.raises(ValueError):
        MinReasonLength(0, [0])


def test_greedy_reasons_with_a_minimum_length_reach_it(tiny_run):
    """Through generate_texts' kwargs, a model pushed to end its reason at once with a line break (the tiny model
    never ends on its own) writes no stop token (end of text or line break) before min_new_tokens and stops right
    there; the candidate cache of a run decoded with it is a different file from the plain one's."""
    from dataclasses import replace

    from transformers import LogitsProcessorList

    from recreason.config import GenerateConfig
    from recreason.generation.generate import _decode_kwargs, stop_token_ids
    from recreason.inference import Predictor, Request
    from recreason.inference.candidates import cache_path

    cfg = GenerateConfig(max_new_tokens=16, precision="fp32")
    predictor = Predictor(tiny_run[0], cfg)
    tok = predictor.tokenizer
    stops = stop_token_ids(tok)
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    assert tok.eos_token_id in stops and newline in stops and set(tok.all_special_ids) <= set(stops)
    assert tok("the", add_special_tokens=False)["input_ids"][0] not in stops
    records = predictor.dataset.subset(1, "test")[:6]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    tok.padding_side = "left"
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")

    def wants_to_end(input_ids, scores):
        scores[:, newline] += 1e4
        return scores

    def first_stop(min_new: int) -> list[int]:
        kwargs = _decode_kwargs(replace(cfg, min_new_tokens=min_new), tok)
        kwargs["logits_processor"] = LogitsProcessorList([wants_to_end, *kwargs.get("logits_processor", [])])
        new = predictor.model.generate(batch["input_ids"], batch["attention_mask"], **kwargs).tolist()
        return [next((k for k, t in enumerate(row) if t in stops), len(row)) for row in new]

    assert first_stop(0) == [0] * 6
    assert first_stop(10) == [10] * 6
    assert cache_path(predictor, "test", replace(cfg, min_new_tokens=10)) != cache_path(predictor, "test", cfg)


def test_the_own_greedy_loop_writes_generates_tokens_and_lets_finished_rows_go(tiny_run):
    """greedy_decode gives each prompt exactly the tokens transformers' generate gives it (up to and including its
    end-of-text token), with a logits processor in play; rows that have ended leave the batch, so the steps
    after the first ending feed fewer rows."""

    from recreason.config import GenerateConfig
    from recreason.generation.generate import greedy_decode
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=8, precision="fp32"))
    tok, lm = predictor.tokenizer, predictor.model.lm
    eos = tok.eos_token_id
    records = predictor.dataset.subset(1, "test")[:6]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    tok.padding_side = "left"
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")

    class EndsByContent:  # a row ends once the sum of its tokens is a multiple of 3: the same rule in any batch
        def __init__(self):
            self.start = None

        def __call__(self, input_ids, scores):
            self.start = input_ids.shape[1] if self.start is None else self.start
            if input_ids.shape[1] > self.start:
                ends = (input_ids.sum(1) % 3 == 0).nonzero().squeeze(-1)
                scores[ends, eos] = 1e4
            return scores

    rows_seen: list[int] = []
    hook = lm.get_input_embeddings().register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    try:
        ours = greedy_decode(lm, dict(batch), 8, [eos], [EndsByContent()])
    finally:
        hook.remove()
    from transformers import LogitsProcessorList

    theirs = predictor.model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8, do_sample=False,
                                      pad_token_id=tok.pad_token_id, eos_token_id=eos,
                                      logits_processor=LogitsProcessorList([EndsByContent()])).tolist()
    theirs = [row[: row.index(eos) + 1] if eos in row else row for row in theirs]
    assert ours == theirs
    lengths = sorted(len(row) for row in ours)
    assert lengths[0] < 8 and lengths[0] < lengths[-1]  # rows end at different steps, some before the limit
    steps = rows_seen[-len(max(ours, key=len)):]  # one forward per generated token of the longest row
    assert steps[0] == 6 and steps == sorted(steps, reverse=True) and steps[-1] < 6
    assert steps == [sum(len(row) > k for row in ours) for k in range(len(steps))]


def test_grouped_attention_gives_eager_attentions_logits_without_copying_the_cache(tiny_run):
    """The CPU inference attention folds each key/value head's query heads together instead of repeating the cache
    (the tiny model has 4 query heads on 2 key/value heads); on a padded batch, prefill and a cached step, its
    logits are eager attention's."""
    import torch

    from recreason.models.registry import GROUPED_ATTENTION, use_grouped_attention
    from recreason.rundir import Run

    model, tok = Run(tiny_run[0]).load_model(dtype="fp32")
    lm = model.lm
    tok.padding_side = "left"
    batch = tok(["a short prompt", "a somewhat longer prompt than the other"], return_tensors="pt", padding=True)

    def logits():
        with torch.no_grad():
            first = lm(**batch, use_cache=True)
            mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            step = lm(input_ids=first.logits[:, -1:].argmax(-1), attention_mask=mask, cache=first.cache)
        return first.logits, step.logits

    lm.set_attn_implementation("eager")
    eager = logits()
    assert use_grouped_attention(lm) and lm.config._attn_implementation == GROUPED_ATTENTION
    grouped = logits()
    mask = batch["attention_mask"].bool()
    assert torch.allclose(eager[0][mask], grouped[0][mask], atol=1e-5)  # padded positions carry no meaning
    assert torch.allclose(eager[1], grouped[1], atol=1e-5)


def test_small_products_are_taken_the_other_way_round_only_where_it_pays():
    """A linear layer switched by transposed_small_products gives F.linear's output (to rounding) for a few rows,
    and hands larger inputs and anything needing gradients to F.linear itself."""
    import torch
    import torch.nn.functional as F

    from recreason.models.registry import SMALL_PRODUCT_ROWS, transposed_small_products

    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    transposed_small_products(torch.nn.Sequential(layer))
    transposed_small_products(torch.nn.Sequential(layer))  # idempotent
    few = torch.randn(3, 5, 24)
    with torch.no_grad():
        out = layer(few)
        assert out.shape == (3, 5, 40)
        assert torch.allclose(out, F.linear(few, layer.weight, layer.bias), atol=1e-6)
        many = torch.randn(SMALL_PRODUCT_ROWS + 1, 24)
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
    trained = layer(few)
    assert trained.requires_grad and torch.equal(trained, F.linear(few, layer.weight, layer.bias))


def test_packed_products_equal_f_linear_bit_for_bit_and_follow_weight_changes():
    """A bf16 linear layer switched by packed_products gives exactly F.linear's output for decoding's and prefill's
    shapes, packs its weight again after an in-place change, and leaves fp32 inputs and gradients to the layer's
    previous forward (transposed_small_products' here)."""
    import torch
    import torch.nn.functional as F

    from recreason.models.registry import packed_products, transposed_small_products

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).to(torch.bfloat16)
    transposed_small_products(torch.nn.Sequential(layer))
    if not packed_products(torch.nn.Sequential(layer)):  # no oneDNN bf16 here: the layer is left as it was
        assert not getattr(layer, "_recreason_packed", False)
        return
    packed_products(torch.nn.Sequential(layer))  # idempotent
    with torch.no_grad():
        for shape in ((5, 64), (192, 64), (3, 40, 64)):
            x = torch.randn(*shape).to(torch.bfloat16)
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        first = layer._recreason_weight
        layer.weight.mul_(2)  # changed in place, as an optimizer step does
        x = torch.randn(7, 64).to(torch.bfloat16)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and layer._recreason_weight is not first
        layer.float()
        x32 = torch.randn(4, 64)
        assert torch.allclose(layer(x32), F.linear(x32, layer.weight, layer.bias), atol=1e-6)
    assert layer(x32).requires_grad  # training goes through the layer's own forward


def test_a_gated_mlp_runs_gate_and_up_as_one_packed_product_with_the_same_bits():
    """packed_products runs a llama MLP's gate and up products as one against both weights packed together: its
    output equals the MLP's own forward bit for bit at decoding's and prefill's shapes, follows an in-place weight
    change, and fp32 inputs and gradients take the MLP's own forward."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from recreason.models.registry import packed_products

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=160, hidden_act="silu")).to(torch.bfloat16)
    own = LlamaMLP.forward.__get__(mlp)  # the unfused forward, its products F.linear's
    if not packed_products(mlp):  # no oneDNN bf16 here
        return
    assert mlp._recreason_packed and packed_products(mlp)  # idempotent
    with torch.no_grad():
        for shape in ((5, 64), (51, 64), (192, 64), (3, 40, 64)):
            x = torch.randn(*shape).to(torch.bfloat16)
            assert torch.equal(mlp(x), own(x)) and mlp(x).shape == (*shape[:-1], 64)
        first = mlp._recreason_weight
        mlp.up_proj.weight.mul_(2)  # changed in place, as an optimizer step does
        x = torch.randn(7, 64).to(torch.bfloat16)
        assert torch.equal(mlp(x), own(x)) and mlp._recreason_weight is not first
        mlp.float()
        x32 = torch.randn(4, 64)
        assert torch.allclose(mlp(x32), own(x32), atol=1e-6)
    assert mlp(x32).requires_grad  # training goes through the MLP's own forward


def test_freed_memory_is_reused_without_faulting_pages_in_again():
    """After reuse_freed_memory, a 64 MB block allocated, written and freed over and over is faulted in while the
    heap settles, then no more (glibc maps blocks that large afresh by default: 16,384 page faults every time)."""
    import resource
    import sys

    import torch

    from recreason.models.registry import reuse_freed_memory

    took = reuse_freed_memory()
    assert took == sys.platform.startswith("linux")
    if not took:
        return
    for _ in range(10):  # the heap grows to hold it
        torch.empty(16 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(16 << 20).fill_(1.0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 16384  # not one block's worth in 10


def test_the_continuous_decoder_gives_each_prompt_its_own_greedy_tokens_whenever_it_joins(tiny_run):
    """Prompts joining a running batch between steps, with their own token limits (so rows leave at different
    steps) and the no-repeat rule, get exactly the tokens greedy_decode gives each prompt alone; each is answered
    the step it ends, and the running cache never keeps columns no row attends to."""
    import torch

    from recreason.config import GenerateConfig
    from recreason.generation.engine import ContinuousDecoder
    from recreason.generation.generate import NoRepeatInReason, greedy_decode
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=8, precision="fp32"))
    tok, lm = predictor.tokenizer, predictor.model.lm
    records = predictor.dataset.subset(1, "test")[:7]
    prompts = [tok(predictor.prompt(Request(r.user, r.item, record=r)).prompt, add_special_tokens=False)["input_ids"]
               for r in records]
    limits = [3, 8, 5, 2, 7, 4, 6]
    alone = []
    for ids, limit in zip(prompts, limits):
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        alone.append(greedy_decode(lm, batch, limit, [tok.eos_token_id], [NoRepeatInReason(2)])[0])
    decoder = ContinuousDecoder(lm, tok.pad_token_id, [tok.eos_token_id], max_rows=4, no_repeat_ngram=2)
    answered: dict[int, tuple[int, list[int]]] = {}
    step = 0

    def done(k):
        return lambda tokens: answered.__setitem__(k, (step, list(tokens)))

    for k in range(3):
        decoder.add(prompts[k], limits[k], done(k))
    widths = []
    while decoder.busy:
        step += 1
        if step == 2:
            for k in range(3, 7):  # 4 more while 3 run: one joins now, the rest as rows leave (max_rows 4)
                decoder.add(prompts[k], limits[k], done(k))
        assert decoder.step() <= 4
        if decoder.mask is not None:
            widths.append(decoder.mask.shape[1])
            assert bool(decoder.mask[:, 0].any())  # no all-masked leading column is kept
    assert [answered[k][1] for k in range(7)] == alone
    assert answered[3][0] < answered[1][0]  # a short reason that joined later is answered before a long one
    assert max(widths) <= max(map(len, prompts)) + max(limits)


def test_the_candidate_decoder_gives_each_job_the_draws_it_gets_alone_whenever_it_joins(tiny_run):
    """Jobs of several draws (greedy + seeded samples) joining a running batch between steps, with their own token
    limits and the no-repeat rule, get exactly the tokens and likelihoods greedy_decode gives each prompt's draws
    alone with the same seeds (the shared prompt cache growing and shrinking, later rows' own tokens left-padded);
    each job is answered the step its last draw ends, and no more rows run than there is room for."""
    import torch

    from recreason.config import GenerateConfig
    from recreason.generation import generate as g
    from recreason.generation.engine import CandidateDecoder
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=8, precision="fp32"))
    tok, lm = predictor.tokenizer, predictor.model.lm
    records = predictor.dataset.subset(1, "test")[:7]
    texts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    limits, draws = [3, 8, 5, 2, 7, 4, 6], [3, 2, 4, 1, 3, 2, 4]
    alone = []
    for text, ids, limit, n in zip(texts, prompts, limits, draws):
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        sampler = g.SeededSampler(g.draw_seeds(7, text, range(n)), 0.9, 0.9, tok.eos_token_id)
        with torch.no_grad():
            alone.append(g.greedy_decode(lm, batch, limit, [tok.eos_token_id], [g.NoRepeatInReason(2), sampler],
                                         draws=n, scores=True))
    decoder = CandidateDecoder(lm, tok.pad_token_id, [tok.eos_token_id], max_rows=8, temperature=0.9, top_p=0.9,
                               no_repeat_ngram=2)
    answered: dict = {}
    step, rows, prompts_held, padded = 0, [], [], 0

    def done(k):
        return lambda tokens, logprobs: answered.__setitem__(k, (step, tokens, logprobs))

    for k in range(3):
        decoder.add(prompts[k], limits[k], g.draw_seeds(7, texts[k], range(draws[k])), done(k))
    while decoder.busy:
        step += 1
        if step == 2:  # 4 more while 3 run: they join as rows leave (8 rows at most)
            for k in range(3, 7):
                decoder.add(prompts[k], limits[k], g.draw_seeds(7, texts[k], range(draws[k])), done(k))
        rows.append(decoder.step())
        if decoder.rows:
            prompts_held.append(decoder.prefix.keys[0].shape[0])
            padded += int(decoder.prefix.own_bias is not None)
            assert bool(decoder.own[:, 0].any())  # no own column that no row has is kept
    for k in range(7):
        assert answered[k][1] == alone[k][0]
        assert answered[k][2] == pytest.approx(alone[k][1], abs=1e-5)
    assert max(rows) <= 8 and max(rows) >= 7
    assert answered[3][0] < answered[1][0]  # a one-draw job that joined later is answered before a long one
    assert padded and max(prompts_held) >= 3 and min(prompts_held) == 1  # joined mid-decode; prompts left


def test_a_choice_that_gives_the_likelihood_no_weight_decodes_without_it(tiny_run):
    """Where the choice gives the likelihood no weight (a server's), candidates decode without its log-normaliser:
    the same texts in whole batches and in the running batch, with NaN for the likelihood, and the same choice."""
    import math
    from dataclasses import replace

    import torch

    from recreason.config import GenerateConfig
    from recreason.generation import generate as g
    from recreason.generation.engine import CandidateDecoder
    from recreason.inference import Request

    predictor, texts = _tiny_prompts(tiny_run, 3)
    tok, lm = predictor.tokenizer, predictor.model.lm
    cfg = GenerateConfig(max_new_tokens=6, precision="fp32", candidates=4, batch_size=3, weight_likelihood=0.0)
    calls = []
    original = torch.Tensor.logsumexp
    torch.Tensor.logsumexp = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        with_it = g.generate_candidates(predictor.model, tok, texts, cfg, progress=False)
        counted = len(calls)
        without = g.generate_candidates(predictor.model, tok, texts, cfg, progress=False, likelihood=False)
        assert counted > 0 and len(calls) == counted  # no normaliser computed without the likelihood
        outcomes = {}
        for likelihood in (True, False):
            decoder = CandidateDecoder.for_config(lm, tok, replace(cfg, weight_likelihood=float(not likelihood)), 3)
            assert decoder.likelihood is (not likelihood)
            for k, text in enumerate(texts):
                decoder.add(tok(text, add_special_tokens=False)["input_ids"], 6, g.draw_seeds(cfg.seed, text, range(4)),
                            lambda tokens, lps, k=k, key=likelihood: outcomes.__setitem__((key, k), (tokens, lps)))
            while decoder.busy:
                decoder.step()
    finally:
        torch.Tensor.logsumexp = original
    assert [[c.text for c in cands] for cands in without] == [[c.text for c in cands] for cands in with_it]
    assert all(math.isnan(c.logprob) for cands in without for c in cands)
    assert not any(math.isnan(c.logprob) for cands in with_it for c in cands)
    for k in range(3):  # weight 1: the decoder keeps the likelihood; weight 0: NaN, the same tokens
        assert outcomes[(False, k)][0] == outcomes[(True, k)][0]
        assert all(math.isnan(lp) for lp in outcomes[(True, k)][1]) and not any(map(math.isnan, outcomes[(False, k)][1]))
    prompted = [predictor.prompt(Request(r.user, r.item, record=r)) for r in predictor.dataset.subset(1, "test")[:3]]
    assert [p.prompt for p in prompted] == texts
    assert predictor.choose_among(prompted, without, cfg) == predictor.choose_among(prompted, with_it, cfg)


def _tiny_prompts(tiny_run, n: int):
    """The tiny run's fp32 predictor and the prompts of its first ``n`` test records."""
    from recreason.config import GenerateConfig
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=8, precision="fp32"))
    records = predictor.dataset.subset(1, "test")[:n]
    return predictor, [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]


def test_candidates_decoded_in_the_own_loop_are_generates_and_ended_draws_leave(tiny_run):
    """generate_candidates' own loop (one prefill per prompt, a draw that has ended leaves the batch) writes the
    candidates, counts and likelihoods that transformers' generate writes with the same seeded sampler; draws that
    wrote the same tokens share a row of the model's batch."""
    import torch

    from recreason.config import GenerateConfig
    from recreason.generation.generate import generate_candidates

    predictor, prompts = _tiny_prompts(tiny_run, 4)
    tok = predictor.tokenizer
    # a high temperature over the tiny model's scores: draws end (end-of-text sampled) at different steps
    cfg = GenerateConfig(max_new_tokens=8, precision="fp32", candidates=6, batch_size=2, sample_temperature=50.0,
                         sample_top_p=1.0)
    rows_seen: list[tuple[int, int]] = []
    embed = predictor.model.lm.get_input_embeddings()
    hook = embed.register_forward_hook(lambda module, args, out: rows_seen.append(tuple(args[0].shape)))
    bias = torch.zeros(embed.weight.shape[0])
    bias[tok.eos_token_id] = 8.0  # make ending likely enough to happen within 8 tokens
    head = predictor.model.lm.get_output_embeddings()
    old_bias = head.bias
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        ours = generate_candidates(predictor.model, tok, prompts, cfg, progress=False)
        steps = [rows for rows, width in rows_seen if width == 1]
        theirs = generate_candidates(predictor.model, tok, prompts, cfg, progress=False, own_loop=False)
    finally:
        hook.remove()
        head.bias = old_bias
    assert [[(c.text, c.greedy, c.count) for c in cands] for cands in ours] == \
        [[(c.text, c.greedy, c.count) for c in cands] for cands in theirs]
    assert [c.logprob for cands in ours for c in cands] == \
        pytest.approx([c.logprob for cands in theirs for c in cands], abs=1e-4)
    assert sum(c.count for c in ours[0]) == 6
    # two prompts x six draws: a row per prompt at first (its draws all feed its last token), then a row per
    # distinct draw (the hot samples diverge at once; some end at once)
    assert steps[0] == 2 and all(2 < rows <= 12 for rows in steps[1:8]) and steps[8] == 2


def test_draws_that_agree_share_a_row_and_write_what_they_write_alone(tiny_run):
    """greedy_decode(merge_draws=True): a prompt's draws that have written the same tokens are one row of the
    model's batch, split when they choose apart; every draw writes the tokens and likelihoods it writes with a row
    of its own (fp32), under the reason rules, as draws end at different steps, with and without the shared
    prompt cache."""
    import itertools

    import torch

    from recreason.generation import generate as g

    predictor, prompts = _tiny_prompts(tiny_run, 3)
    tok, lm = predictor.tokenizer, predictor.model.lm
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]},
                    return_tensors="pt")
    eos = tok.eos_token_id

    def end_after_some_tokens(module, args, kwargs, out):  # a row whose last token is a multiple of 5 ends now
        ending = kwargs["input_ids"][:, -1] % 5 == 0
        out.logits[ending, -1, eos] = 1e4
    ender = lm.register_forward_hook(end_after_some_tokens, with_kwargs=True)
    # twins: draws of one seed write the same tokens, so they stay one row while the greedy draw and the other seeds
    # split off; apart: every draw its own seed, so that the rows, ordered by token, come to differ from the draws'
    seeds = {"twins": [s for p in prompts for s in [None, *[g.draw_seeds(3, p, [k])[0] for k in (1, 1, 2, 2, 2, 3, 4)]]],
             "apart": [s for p in prompts for s in g.draw_seeds(3, p, range(8))]}
    rows_seen: list[int] = []
    hook = lm.get_input_embeddings().register_forward_hook(
        lambda module, args, out: rows_seen.append(args[0].shape[0]) if args[0].shape[1] == 1 else None)
    decoded = {}
    try:
        for kind, (shared, merge) in itertools.product(seeds, itertools.product((True, False), repeat=2)):
            rows_seen.clear()
            sampler = g.SeededSampler(seeds[kind], 1.0, 0.95, tok.eos_token_id)
            with torch.no_grad():
                decoded[kind, shared, merge] = g.greedy_decode(lm, dict(batch), 8, [tok.eos_token_id],
                                                               [g.NoRepeatInReason(2), sampler], draws=8, scores=True,
                                                               shared_prefix=shared, merge_draws=merge)
            decoded[kind, shared, merge, "rows"] = list(rows_seen)
    finally:
        hook.remove()
        ender.remove()
    for kind, shared in itertools.product(seeds, (True, False)):
        alone = decoded[kind, False, False]
        lengths = {len(t) for t in alone[0]}
        assert len(lengths) > 2 and max(lengths) == 8  # draws ended at several steps, some ran to the limit
        assert decoded[kind, shared, True][0] == alone[0]
        assert decoded[kind, shared, True][1] == pytest.approx(alone[1], abs=1e-5)
        merged, apart = decoded[kind, shared, True, "rows"], decoded[kind, shared, False, "rows"]
        assert merged[0] == 3 and apart[0] == 24  # a row per prompt, then as many as the draws that differ
        if kind == "twins":  # split, the seeds' twins together
            assert all(m < a for m, a in zip(merged, apart)) and max(merged[1:]) > 3


def test_draws_attend_to_one_copy_of_their_prompts_cache(tiny_run, monkeypatch):
    """greedy_decode's shared prefix (cascade attention): the draws of a prompt attend to one copy of its KV cache
    and write the tokens and likelihoods they write from a copy each; the model's own cache never holds a prompt,
    and a prompt whose draws have all ended leaves the shared cache."""
    import torch

    from recreason.config import GenerateConfig
    from recreason.generation import generate as g
    from recreason.models.registry import SharedPrefix

    predictor, prompts = _tiny_prompts(tiny_run, 3)
    tok = predictor.tokenizer
    cfg = GenerateConfig(max_new_tokens=8, precision="fp32", candidates=5, batch_size=3, sample_temperature=1.0,
                         sample_top_p=1.0)
    idx, batch, extra = next(iter(g._batches(predictor.model, tok, prompts, cfg, None, None, False, "")))
    lm = g._shared_prefill_lm(predictor.model, extra)
    head = lm.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[tok.eos_token_id] = 11.0  # draws end (end-of-text sampled) at different steps
    monkeypatch.setattr(head, "bias", torch.nn.Parameter(bias, requires_grad=False))
    prompts_left, own_tokens = [], []
    select, attend = SharedPrefix.select, SharedPrefix.attend

    def counting_select(self, keep):
        select(self, keep)
        prompts_left.append(self.keys[0].shape[0])

    def counting_attend(self, layer, query, key, value, scaling):
        own_tokens.append(key.shape[2])
        return attend(self, layer, query, key, value, scaling)

    monkeypatch.setattr(SharedPrefix, "select", counting_select)
    monkeypatch.setattr(SharedPrefix, "attend", counting_attend)

    def decode(shared: bool):
        seeds = [None if j == 0 else g.prompt_seed(cfg.seed, prompts[i], j) for i in idx for j in range(5)]
        sampler = g.SeededSampler(seeds, cfg.sample_temperature, cfg.sample_top_p, tok.eos_token_id)
        with torch.no_grad():
            return g.greedy_decode(lm, batch, 8, g._eos_ids(tok), g.reason_processors(cfg, tok) + [sampler], draws=5,
                                   scores=True, shared_prefix=shared)

    copies = decode(False)
    assert not own_tokens  # the baseline never attends through the shared prefix
    shared = decode(True)
    assert shared[0] == copies[0] and len({len(t) for t in shared[0]}) > 1
    assert shared[1] == pytest.approx(copies[1], abs=1e-5)
    prompt_length = int(batch["attention_mask"].sum(1).min())
    assert own_tokens and max(own_tokens) <= 8 < prompt_length
    assert min(prompts_left) < 3, [len(t) for t in shared[0]]


def test_shared_prefix_attention_is_attention_over_each_rows_whole_cache():
    """SharedPrefix.attend, after rows and a whole prompt in the middle have left, gives every row and query head
    eager attention over its prompt's tokens (padding masked) followed by its own tokens; so it does after a
    longer prompt joins (SharedPrefix.join) with rows that have fewer own tokens (own_bias masks the others)."""
    import torch

    from recreason.models.registry import SharedPrefix

    torch.manual_seed(0)
    prompts, draws, kv_heads, group, d, length, own = 3, 4, 3, 3, 8, 7, 2
    keys, values = [torch.randn(prompts, kv_heads, length, d)], [torch.randn(prompts, kv_heads, length, d)]
    mask = torch.ones(prompts, length)
    mask[2, :3] = 0  # the last prompt is shorter: left padding
    shared = SharedPrefix(keys, values, mask, torch.arange(prompts).repeat_interleave(draws))
    keep = torch.tensor([0, 2, 3, 9, 10])  # prompt 1's rows have all ended; prompts 0 and 2 keep some
    shared.select(keep)
    assert shared.keys[0].shape[0] == 2
    q = torch.randn(len(keep), kv_heads * group, 1, d)
    k, v = torch.randn(len(keep), kv_heads, own, d), torch.randn(len(keep), kv_heads, own, d)
    out, _ = shared.attend(0, q, k, v, 0.125)
    assert out.shape == (len(keep), 1, kv_heads * group, d)
    for r, row in enumerate(keep.tolist()):
        p = row // draws
        bias = torch.cat([(1 - mask[p]) * torch.finfo(torch.float32).min, torch.zeros(own)])
        for h in range(kv_heads * group):
            whole_k = torch.cat([keys[0][p, h // group], k[r, h // group]])
            whole_v = torch.cat([values[0][p, h // group], v[r, h // group]])
            weights = torch.softmax(q[r, h, 0] @ whole_k.T * 0.125 + bias, -1)
            assert torch.allclose(out[r, 0, h], weights @ whole_v, atol=1e-5)

    # a longer prompt joins with 3 rows, which have one own token where the others have two: it sees its own
    # prompt and token only, the others are as they were
    longer = length + 2
    new_keys, new_values = [torch.randn(1, kv_heads, longer, d)], [torch.randn(1, kv_heads, longer, d)]
    shared.join(new_keys, new_values, torch.ones(1, longer), torch.zeros(3, dtype=torch.long))
    own_mask = torch.ones(len(keep) + 3, own)
    own_mask[len(keep):, 0] = 0
    shared.own_bias = (1 - own_mask) * torch.finfo(torch.float32).min
    q = torch.randn(len(keep) + 3, kv_heads * group, 1, d)
    k = torch.cat([k, torch.randn(3, kv_heads, own, d)])
    v = torch.cat([v, torch.randn(3, kv_heads, own, d)])
    out, _ = shared.attend(0, q, k, v, 0.125)
    for r in range(len(keep) + 3):
        if r < len(keep):
            p = keep[r].item() // draws
            pk, pv, pbias = keys[0][p], values[0][p], (1 - mask[p]) * torch.finfo(torch.float32).min
        else:
            pk, pv, pbias = new_keys[0][0], new_values[0][0], torch.zeros(longer)
        bias = torch.cat([pbias, (1 - own_mask[r]) * torch.finfo(torch.float32).min])
        for h in range(kv_heads * group):
            whole_k, whole_v = torch.cat([pk[h // group], k[r, h // group]]), torch.cat([pv[h // group], v[r, h // group]])
            weights = torch.softmax(q[r, h, 0] @ whole_k.T * 0.125 + bias, -1)
            assert torch.allclose(out[r, 0, h], weights @ whole_v, atol=1e-5)


def test_a_llama_attention_runs_its_three_products_as_one_with_the_same_bits():
    """packed_products runs a llama attention layer's query, key and value products as one packed product and turns
    queries and keys by the rotary embedding together: its outputs and the cache it fills equal the layer's own
    forward bit for bit, in a prefill with padding and in the decoding steps after it, with the layer's attention
    either eager or grouped; fp32 inputs take the layer's own forward."""
    import torch
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from transformers import AttentionInterface

    from recreason.models.registry import GROUPED_ATTENTION, grouped_attention, packed_products

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         intermediate_size=64, num_hidden_layers=1)
    config._attn_implementation = "eager"
    layer = LlamaAttention(config, 0).to(torch.bfloat16).eval()
    own = LlamaAttention.forward.__get__(layer)
    rotary = LlamaRotaryEmbedding(config)
    if not packed_products(layer):  # no oneDNN bf16 here
        return
    assert layer._recreason_packed and packed_products(layer)  # idempotent
    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)  # as use_grouped_attention does for a model
    for implementation in ("eager", GROUPED_ATTENTION):
        config._attn_implementation = implementation
        caches = DynamicCache(), DynamicCache()
        x = torch.randn(3, 9, 128).to(torch.bfloat16)
        mask = torch.zeros(3, 1, 9, 9)
        mask[2, :, :, :4] = torch.finfo(torch.bfloat16).min  # the last prompt is left-padded
        mask = (mask + torch.triu(torch.full((9, 9), torch.finfo(torch.bfloat16).min), 1)).to(torch.bfloat16)
        positions = torch.arange(9).repeat(3, 1)
        with torch.no_grad():
            for step in range(3):
                embeddings = rotary(x, positions)
                ours = layer(x, position_embeddings=embeddings, attention_mask=mask, cache=caches[0])[0]
                theirs = own(x, position_embeddings=embeddings, attention_mask=mask, cache=caches[1])[0]
                assert torch.equal(ours, theirs), (implementation, step)
                assert all(torch.equal(a, b) for a, b in zip(caches[0].layers[0].keys, caches[1].layers[0].keys))
                assert torch.equal(caches[0].layers[0].values, caches[1].layers[0].values)
                x, positions = torch.randn(3, 1, 128).to(torch.bfloat16), positions[:, -1:] + 1
                mask = torch.zeros(3, 1, 1, 10 + step, dtype=torch.bfloat16)
                mask[2, :, :, :4] = torch.finfo(torch.bfloat16).min
    layer.float()
    config._attn_implementation = "eager"
    x32 = torch.randn(2, 3, 128)
    embeddings = rotary(x32, torch.arange(3).repeat(2, 1))
    with torch.no_grad():
        assert torch.equal(layer(x32, position_embeddings=embeddings, attention_mask=None)[0],
                           own(x32, position_embeddings=embeddings, attention_mask=None)[0])
