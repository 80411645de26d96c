"""The generated sub-tasks (``gen[:<subtask>]``): determinism, size, well-formed options, splits (no model)."""

from collections import Counter

import pytest

from layerroute.tasks import GENERATED_SUBTASKS, SPLITS, TaskError, get_task, letter_index, list_tasks
from layerroute.tasks.generated import DEFAULT_SIZE, GENERATORS, Item, load_generated, number_words


@pytest.fixture(scope="module")
def every():
    return {sub: get_task(f"gen:{sub}") for sub in GENERATED_SUBTASKS}


def gold_of(ex):
    return ex.choices[letter_index(ex.answer)]


def test_deterministic_from_seed(every):
    for sub, task in every.items():
        again, other = get_task(f"gen:{sub}", seed=0), get_task(f"gen:{sub}", seed=1)
        assert again.examples == task.examples
        assert len({e.uid for e in other.examples} & {e.uid for e in task.examples}) < len(task)
        small = get_task(f"gen:{sub}", size=50)
        assert small.examples == task.examples[:50]  # a smaller size is a prefix of a larger one


def test_at_least_2000_distinct_examples_each(every):
    assert DEFAULT_SIZE >= 2000
    for sub, task in every.items():
        assert len(task) == DEFAULT_SIZE and GENERATORS[sub][1] >= 2000
        assert len({e.uid for e in task.examples}) == len(task)  # Task also refuses duplicates
        assert len({e.question for e in task.examples}) == len(task)
        assert all(e.uid.startswith(f"gen/{sub}/") for e in task.examples)


def test_options_gold_and_three_distinct_distractors(every):
    for sub, task in every.items():
        assert task.kind == "choice" and task.choice_scoring == "cloze"
        for ex in task.examples:
            assert len(ex.choices) == 4 == len(set(ex.choices)), ex
            assert all(c and c == c.strip() for c in ex.choices), ex  # the scorer adds the space
            assert ex.answer_prefix and not ex.answer_prefix.endswith(" ")
            assert [c for c in ex.choices if c == gold_of(ex)] == [gold_of(ex)]
        letters = Counter(e.answer for e in task.examples)
        assert set(letters) == set("ABCD") and min(letters.values()) > 0.2 * len(task), (sub, letters)


def test_golds_are_right():
    for ex in load_generated().examples:
        sub, key = ex.uid.split("/")[1:]
        gold = gold_of(ex)
        if sub == "add2":
            a, b = map(int, key.split("+"))
            assert gold == str(a + b) and ex.question == f"What is {a} + {b}?"
        elif sub == "mul":
            a, b = map(int, key.split("x"))
            assert gold == str(a * b) and ex.question == f"What is {a} × {b}?"
        elif sub == "compare":
            word, nums = key.split(":")
            nums = nums.split("-")
            assert gold == (max if word == "largest" else min)(nums, key=int) and sorted(ex.choices) == sorted(nums)
        else:
            assert sub == "numwords" and ex.question == f"Write the number {number_words(int(gold))} in digits."
            assert all(len(c) == len(gold) and sorted(c) == sorted(gold) for c in ex.choices)
    assert number_words(7027) == "seven thousand twenty-seven" and number_words(0) == "zero"
    assert number_words(310_090) == "three hundred ten thousand ninety"
    assert number_words(1910) == "one thousand nine hundred ten"


def test_capacities_are_exact_where_countable():
    counts = {"add2": len([(a, b) for a in range(10, 100) for b in range(10, 100)]),
              "mul": 2 * len([(a, b) for a in range(2, 10) for b in range(11, 200)])}
    assert {sub: GENERATORS[sub][1] for sub in counts} == counts
    assert len(get_task("gen:add2", size=counts["add2"])) == counts["add2"]  # every one of them can be drawn


def test_splits_disjoint_and_cover(every):
    for task in every.values():
        parts = {s: {e.uid for e in task.split(s).examples} for s in SPLITS}
        assert sum(map(len, parts.values())) == len(task)
        assert set().union(*parts.values()) == {e.uid for e in task.examples}
        assert all(not (parts[a] & parts[b]) for a in SPLITS for b in SPLITS if a < b)
        assert 0.2 * len(task) < len(parts["test"]) < 0.4 * len(task)


def test_registry_spec_mixes_all_subtasks(every):
    assert f"gen[:{'|'.join(GENERATED_SUBTASKS)}]" in list_tasks(usage=True)
    mixed = get_task("gen", size=300)
    assert mixed.name == "gen" and len(mixed) == 300 * len(GENERATED_SUBTASKS)
    first = Counter(e.uid.split("/")[1] for e in mixed.examples[:10 * len(GENERATED_SUBTASKS)])
    assert set(first.values()) == {10}  # round-robin: any prefix holds every sub-task alike
    assert set(mixed.examples) == {e for t in every.values() for e in t.examples[:300]}


def test_errors_name_the_valid_subtasks(monkeypatch):
    with pytest.raises(TaskError, match="unknown gen sub-task 'add3'") as e:
        get_task("gen:add3")
    assert all(sub in str(e.value) for sub in GENERATED_SUBTASKS)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(TaskError, match="size must be a positive whole number"):
            get_task("gen:add2", size=bad)
    sub, (_, capacity) = min(GENERATORS.items(), key=lambda kv: kv[1][1])
    with pytest.raises(TaskError, match=f"only {capacity} distinct"):
        get_task(f"gen:{sub}", size=capacity + 1)
    monkeypatch.setitem(GENERATORS, "add2", (lambda rng: Item("k", "q", "1", ("2", "3", "4"), "So"), 10))
    with pytest.raises(TaskError, match="could not draw 2 distinct examples"):  # never loops forever
        get_task("gen:add2", size=2)


def test_cloze_example_shared_with_the_suite():
    from layerroute.tasks.base import cloze_example, stable_rng

    ex = cloze_example("u/1", "q?", "7", ["7", "3", "5", "9", "3"], stable_rng("k"), must=("3",), answer_prefix="So")
    assert gold_of(ex) == "7" and "3" in ex.choices and len(set(ex.choices)) == 4 and ex.answer_prefix == "So"
    assert ex == cloze_example("u/1", "q?", "7", ["9", "5", "3", "7"], stable_rng("k"), must=("3",), answer_prefix="So")
    with pytest.raises(TaskError, match="cannot make 4 distinct options from gold '7'"):
        cloze_example("u/2", "q?", "7", ["7", "3", "3"], stable_rng("k"))
