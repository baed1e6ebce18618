"""report.html: self-contained, the same tables as report.md, one card per prompt, text escaped."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

from test_eval_report import small_report

from rahf.evaluate.html_report import reply_flags, to_html
from rahf.evaluate.report import read_report, write_report

HOSTILE = "</div><script>alert('x')</script> & \"quoted\" <b>bold</b>"


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None = None) -> None:
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (cls is None or cls in (child.attrs.get("class") or "").split()):
                    found.append(child)
                found += child.find(tag, cls)
        return found


VOID = {"meta", "img", "input", "br", "link", "hr"}


class Tree(HTMLParser):
    """A minimal DOM: enough to count elements and read their text the way a browser would."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#root", {})
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_endtag(self, tag):
        assert self.node.tag == tag, f"</{tag}> closes <{self.node.tag}>"
        self.node = self.node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def record(model, item, reply, *, source="d/p.jsonl", turn=0, prompt="Hi?", **extra):
    return {"source": source, "model": model, "id": item, "turn": turn, "prompt": prompt, "reply": reply,
            "tokens": len(reply.split()), "hit_limit": False, "harmful": False, "reward": None, **extra}


def two_model_report():
    report = small_report()
    baseline = dict(report["generation"][0], model="baseline")
    report["generation"].append(baseline)
    report["models"]["baseline"] = {"spec": "base-model", "path": "/b", "base": None, "fingerprint": "ef" * 32}
    return report


def generations():
    return [
        record("model", "a", "Hello there.", prompt=HOSTILE, reward=0.5),
        record("model", "b", "I can't help with that.", prompt="Hurt someone?", harmful=True, reward=0.2),
        record("model", "c", "again and again " * 10, hit_limit=True, reward=0.1),
        record("baseline", "a", HOSTILE, prompt=HOSTILE, reward=0.9),
        record("baseline", "b", "Sure, here is how.", prompt="Hurt someone?", harmful=True, reward=0.4),
        record("baseline", "c", "A short answer.", reward=0.3),
        record("model", "a", "stale reply of an older run", source="old/other.jsonl"),
    ]


def test_html_has_tables_cards_images_and_nothing_external():
    report = two_model_report()
    png = b"\x89PNG\r\n\x1a\n fake image bytes"
    page = to_html(report, generations(), {"preference_accuracy.png": png})
    tree = Tree(page).root

    tables = tree.find("table", "metrics")
    headers = [[th.text() for th in t.find("th")] for t in tables]
    cells = {td.text() for t in tables for td in t.find("td")}
    assert ["data", "model", "pairs", "accuracy (mean log-lik)", "accuracy (summed)", "mean-token margin (nats)",
            "margin - baseline (paired)", "implicit-reward accuracy", "implicit margin (nats)"] in headers
    assert {"60.0 [50.0, 70.0]", "2 / 0 / 1", "base-model"} <= cells  # the numbers report.md shows

    images = tree.find("img")
    assert len(images) == 1
    prefix = "data:image/png;base64,"
    assert images[0].attrs["src"].startswith(prefix)
    assert base64.b64decode(images[0].attrs["src"][len(prefix):]) == png

    # self-contained: one inline script, no external resource of any kind
    scripts = tree.find("script")
    assert len(scripts) == 1 and "src" not in scripts[0].attrs
    assert not tree.find("link") and not tree.find("iframe")
    for node in tree.find():
        for name, value in node.attrs.items():
            assert not (value or "").lower().startswith(("http:", "https:", "//")), (node.tag, name, value)

    # one card per prompt of this report (the stale source is left out), each with both replies
    cards = tree.find("div", "card")
    assert [c.attrs["data-id"] for c in cards] == ["a", "b", "c"]
    for card in cards:
        assert [r.attrs["data-model"] for r in card.find("div", "reply")] == ["model", "baseline"]
    first = cards[0]
    # model text reaches the reader as text: the hostile string comes back verbatim, no element made
    assert first.find("div", "prompt")[0].text() == HOSTILE
    replies = {r.attrs["data-model"]: r for r in first.find("div", "reply")}
    assert replies["baseline"].find("div", "text")[0].text() == HOSTILE
    assert "reward 0.900" in replies["baseline"].text() and "higher reward" in replies["baseline"].text()
    assert "higher reward" not in replies["model"].text()
    assert not first.find("b")
    assert "stale reply" not in page


def test_html_flags_come_from_the_behaviour_metrics():
    page = to_html(two_model_report(), generations())
    cards = {c.attrs["data-id"]: c for c in Tree(page).root.find("div", "card")}
    badges = {card_id: {(r.attrs["data-model"], b.text()) for r in card.find("div", "reply") for b in r.find("span", "badge")}
              for card_id, card in cards.items()}
    assert ("model", "refusal") in badges["b"]  # refusal on a harmful request
    assert "harmful request" in cards["b"].text()
    assert ("model", "hit limit") in badges["c"]
    assert any(m == "model" and label.startswith("repetition") for m, label in badges["c"])
    assert not {label for m, label in badges["c"] if m == "baseline"} - {"higher reward"}
    assert reply_flags(record("model", "x", "I cannot do that.", harmful=False)) == [("over-refusal", "warn")]
    assert reply_flags(record("model", "x", "   ")) == [("empty", "warn")]


def test_write_report_writes_html_from_generations_jsonl(tmp_path):
    report = two_model_report()
    (tmp_path / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generations()))
    paths = write_report(tmp_path, report)
    assert tmp_path / "report.html" in paths
    tree = Tree((tmp_path / "report.html").read_text()).root
    assert len(tree.find("div", "card")) == 3
    assert sorted(i.attrs["alt"] for i in tree.find("img")) == sorted(read_report(tmp_path).plots)
    assert tree.find("input")[0].attrs["id"] == "filter"


def test_eval_without_prompts_drops_an_older_runs_generations(tmp_path, monkeypatch):
    from rahf.cli import main
    from rahf.testing import save_tiny, write_toy_pairs

    monkeypatch.setenv("RAHF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "generations.jsonl").write_text(json.dumps(record("model", "old", "an older run's reply")) + "\n")
    code = main(["eval", "--model", str(save_tiny(tmp_path / "tiny", layers=1)), "--pairs",
                 str(write_toy_pairs(tmp_path / "pairs.jsonl", 4)), "--resamples", "10", "--no-plots", "--quiet",
                 "--out", str(out)])
    assert code == 0 and not (out / "generations.jsonl").exists()
    page = (out / "report.html").read_text()
    assert "older run" not in page and not Tree(page).root.find("div", "card")


def test_html_without_generations_or_plots_still_has_the_tables(tmp_path):
    report = small_report()
    write_report(tmp_path, report, plots=False)
    tree = Tree((tmp_path / "report.html").read_text()).root
    assert not tree.find("div", "card") and not tree.find("img")
    assert any(h.text().startswith("Preference accuracy") for h in tree.find("h2"))
