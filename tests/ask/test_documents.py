"""Page selection for long-document QA: BM25 ranking, common caps, and plans that always fit."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kimivl_cli.tasks.documents import bm25_scores, common_cap, page_list, plan_pages, terms


def test_terms_drop_case_stopwords_and_single_letters() -> None:
    assert terms("What is the DER encoding of a SEQUENCE?") == ["der", "encoding", "sequence"]


def test_bm25_prefers_rare_terms_and_scores_unrelated_pages_zero() -> None:
    pages = [
        "introduction to the library and its licence",
        "asn1_der_decoding decodes DER bytes into a structure; DER DER",
        "the DER encoding of integers",
        "",
    ]
    scores = bm25_scores("How does asn1_der_decoding handle DER?", pages)
    assert scores[0] == 0.0 and scores[3] == 0.0
    assert scores[1] > scores[2] > 0  # both say DER; only page 1 names the function


def test_bm25_on_the_real_manual_finds_the_function_reference(libtasn1_pdf: Path) -> None:
    from kimivl_cli.media.pdf import PdfDocument

    with PdfDocument(libtasn1_pdf) as doc:
        texts = [doc.text(i) for i in range(doc.page_count)]
    scores = bm25_scores("What does asn1_der_decoding_element return?", texts)
    best = max(range(len(texts)), key=scores.__getitem__)
    assert "asn1_der_decoding_element" in texts[best]


def test_common_cap_is_the_largest_that_fits() -> None:
    assert common_cap([100, 300, 500], 10_000) is None
    cap = common_cap([100, 300, 500], 600)
    assert cap == 250  # 100 + 250 + 250
    assert sum(min(c, cap + 1) for c in [100, 300, 500]) > 600


def test_plan_keeps_everything_when_it_fits_then_shrinks_then_ranks() -> None:
    costs, texts = [1000] * 4, ["cats", "dogs", "bird feathers", "dogs and cats"]
    full = plan_pages(costs, texts, "dogs", 4000)
    assert full.keep == (0, 1, 2, 3) and full.cap is None and not full.ranked
    small = plan_pages(costs, texts, "dogs", 2000, min_page_tokens=256)
    assert small.keep == (0, 1, 2, 3) and small.cap == 500 and not small.ranked
    ranked = plan_pages(costs, texts, "dogs", 600, min_page_tokens=256)
    assert ranked.ranked and ranked.matched and ranked.keep == (1, 3) and ranked.cap == 300
    unmatched = plan_pages(costs, texts, "zebra", 600, min_page_tokens=256)
    assert unmatched.keep == (0, 1) and not unmatched.matched  # ties go to the earlier pages
    assert plan_pages(costs, texts, "dogs", 100, min_page_tokens=256).keep == ()


def test_label_overheads_are_paid_by_every_kept_page() -> None:
    plan = plan_pages([300, 300], ["a", "b"], "q", 620, min_page_tokens=100, overheads=[20, 20])
    assert plan.keep == (0, 1) and plan.cap == 290


@given(
    costs=st.lists(st.integers(1, 1500), min_size=1, max_size=40),
    budget=st.integers(0, 20_000),
    floor=st.integers(1, 600),
    overhead=st.integers(0, 30),
    words=st.lists(st.sampled_from(["der", "ber", "tag", "oid", "x"]), min_size=0, max_size=3),
)
def test_plans_always_fit_and_respect_the_floor(costs, budget, floor, overhead, words) -> None:
    texts = [" ".join(words[: i % 4]) for i in range(len(costs))]
    overheads = [overhead] * len(costs)
    plan = plan_pages(costs, texts, "der tag", budget, floor, overheads)
    assert list(plan.keep) == sorted(set(plan.keep))
    assert plan.tokens(costs) + overhead * len(plan.keep) <= budget
    if plan.cap is not None and plan.keep:
        assert plan.cap >= min(floor, max(costs[i] for i in plan.keep))
    if sum(costs) + sum(overheads) <= budget:
        assert plan.keep == tuple(range(len(costs))) and plan.cap is None
    if not plan.keep:
        assert min(min(c, floor) + overhead for c in costs) > budget


def test_page_list_compacts_runs() -> None:
    assert page_list([10, 1, 2, 3, 7, 9]) == "1-3, 7, 9-10"
    assert page_list([5]) == "5"
