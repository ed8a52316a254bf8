"""The serving store, on SQLite and on a real PostgreSQL server, through the same tests."""

import threading

import pytest

from recreason.data.records import Explained
from recreason.serving.store import Interaction, PostgresStore, SQLiteStore, open_store


def _records(n: int) -> list[Explained]:
    return [Explained(index=k, user=f"u{k % 3}", item=f"i{k}", rating=float(1 + k % 5), timestamp=1000 + k,
                      feature="tone", opinion="great", sentence=f"great tone {k}", sentiment=1, summary="",
                      features=["tone"]) for k in range(n)]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'serving.db'}"
    return request.getfixturevalue("postgres_url")


def test_open_store_picks_the_backend(store_url):
    store = open_store(store_url)
    assert isinstance(store, SQLiteStore if store_url.startswith("sqlite") else PostgresStore)
    store.close()
    with pytest.raises(ValueError, match="'redis' is not supported"):
        open_store("redis://localhost/0")


def test_seed_once_then_add_and_read_in_order(store_url):
    store = open_store(store_url)
    assert not store.seeded()
    assert store.seed(_records(5), "dataset-a") == 5
    assert store.seeded() and store.seed(_records(5), "dataset-a") == 0  # a second seeding is refused
    assert [i.seq for i in store.interactions()] == [1, 2, 3, 4, 5]
    assert [i.item for i in store.interactions("u1")] == ["i1", "i4"]
    assert store.user_version("u1") == 0
    v1 = store.add_interaction(Interaction("u1", "i9", 4.0, "nice strings", 2000, ["strings"]))
    v2 = store.add_interaction(Interaction("u1", "i8", 2.0, "bad tone", 2001, ["tone"]))
    assert (v1, v2) == (1, 2) and store.user_version("u1") == 2
    after = store.interactions_after(5)
    assert [(i.seq, i.item, i.rating, i.features) for i in after] == [(6, "i9", 4.0, ["strings"]), (7, "i8", 2.0, ["tone"])]
    assert store.items() == sorted({f"i{k}" for k in range(5)} | {"i8", "i9"})
    store.close()


def test_acknowledged_writes_survive_a_restart_and_reach_other_processes(store_url):
    writer, reader = open_store(store_url), open_store(store_url)
    writer.seed(_records(2), "d")
    writer.add_interaction(Interaction("new", "i0", 5.0, "great", 3000))
    assert [i.user for i in reader.interactions_after(2)] == ["new"]  # another connection, as another replica
    writer.close()
    reader.close()
    reopened = open_store(store_url)
    assert reopened.user_version("new") == 1 and len(reopened.interactions()) == 3
    reopened.close()


def test_concurrent_writers_get_consecutive_sequence_numbers(store_url):
    stores = [open_store(store_url) for _ in range(3)]
    stores[0].seed([], "empty")
    errors = []

    def write(store, user):
        try:
            for k in range(10):
                store.add_interaction(Interaction(user, f"i{k}", 3.0, "ok", k))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, f"w{n}")) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    seqs = [i.seq for i in stores[0].interactions()]
    assert seqs == list(range(1, 31))  # no gaps, no duplicates: a reader that saw seq n has seen all before it
    assert {stores[0].user_version(f"w{n}") for n in range(3)} == {10}
    for s in stores:
        s.close()
