"""The console's pages and actions. Every action is audited (who, what, which); customer
values (names, contacts, response bodies, payload fields) reach a page only through a
reveal, itself an audited POST whose answer is not cached."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from connector.console._web import MAX_ID, Form, Web, action, as_id, first, ids, page
from connector.console.auth import Session
from connector.console.chart import throughput_svg
from connector.explain import build_story, story_json
from connector.quarantine import judge
from connector.store.abc import DeadLetter

LIST_LIMIT = 500  # rows a list shows; "all matching" acts on every match, not only these
MATCH_LIMIT = 100_000  # dead letters or conflicts one "all matching" action may touch
LETTER_KEYS = ("dispensary", "destination", "op", "code")
OPERATIONS = ("upsert", "unsubscribe", "subscribe", "merge", "deactivate")


def _back(path: str, form: Form, keys: tuple[str, ...]) -> RedirectResponse:
    query = urlencode({k: first(form, k) for k in keys if first(form, k)})
    return RedirectResponse(path + (f"?{query}" if query else ""), status_code=303)


def _filter_text(filters: dict[str, Any]) -> str:
    shown = [f"{k}={v}" for k, v in filters.items() if v not in (None, "")]
    return " ".join(shown) or "no filter"


def routes(web: Web) -> list[BaseRoute]:
    store = web.store

    # --- overview ---

    @page(web)
    async def overview(request: Request, session: Session) -> Response:
        now = time.time()
        rows = await web.call(store.overview)
        runs = await web.call(store.runs, None, 10)
        points = await web.call(store.throughput, now - 86_400, 3600)
        return web.render(
            request,
            "overview.html",
            session,
            rows=rows,
            runs=runs,
            now=now,
            chart=throughput_svg(points, now),
            delivered_day=sum(n for _, n in points),
        )

    # --- dead letters ---

    def letter_filters(source: dict[str, str]) -> dict[str, str]:
        return {k: source.get(k, "").strip() for k in LETTER_KEYS}

    async def matching_letters(
        filters: dict[str, str], limit: int, *, everything: bool = False
    ) -> tuple[list[DeadLetter], dict[int, str | None]]:
        code = filters["code"]
        status = as_id(code) if code.isascii() and code.isdecimal() else None
        if code and code.isdecimal() and status is None:
            return [], {}  # a number no stored status can be
        letters = await web.call(
            store.dead_letters,
            dispensary=filters["dispensary"] or None,
            destination=filters["destination"] or None,
            op=filters["op"] or None,
            status_code=status,
            code=code if code and status is None else None,  # a vendor's code
            include_replayed=everything,
            limit=limit,
        )
        codes = await web.call(store.dead_letter_codes, letters)
        return letters, codes

    @page(web)
    async def dead_letters(request: Request, session: Session) -> Response:
        filters = letter_filters(dict(request.query_params))
        everything = request.query_params.get("all") == "1"
        letters, codes = await matching_letters(filters, LIST_LIMIT, everything=everything)
        return web.render(
            request,
            "dead_letters.html",
            session,
            everything=everything,
            open_count=sum(1 for x in letters if x.replayed_at is None),
            letters=letters,
            codes=codes,
            filters=filters,
            operations=OPERATIONS,
            limit=LIST_LIMIT,
        )

    @action(web)
    async def replay_letters(request: Request, session: Session, form: Form) -> Response:
        filters = letter_filters({k: first(form, k) for k in LETTER_KEYS})
        back = _back("/dead-letters", form, LETTER_KEYS)
        code = filters["code"]
        vendor = bool(code) and not (code.isascii() and code.isdecimal())
        if first(form, "one"):
            chosen = ids(form, "one")
            target = ", ".join(f"dead letter {i}" for i in chosen) or "no dead letter"
        elif first(form, "scope") == "all":
            target = f"all dead letters matching {_filter_text(filters)}"
            chosen = None
        else:
            chosen = ids(form)
            target = f"dead letters {', '.join(map(str, chosen))}"
        if chosen is None and code and not vendor and as_id(code) is None:
            chosen = []  # a number no stored status can be: nothing matches, not everything
        if chosen is not None and not chosen:
            session.flash.append("No dead letter was selected or matches that filter.")
            return back
        # as the command line does: what was asked is audited before anything moves
        await web.audit(session.who, "dlq_replay_asked", target)
        if chosen is None:
            done = await web.call(
                store.replay,
                dispensary=filters["dispensary"] or None,
                destination=filters["destination"] or None,
                op=filters["op"] or None,
                status_code=as_id(code) if code and not vendor else None,
                code=code if vendor else None,
            )
        else:
            done = await web.call(store.replay, ids=chosen)
        result = (
            f"replayed {done.replayed}, superseded {done.superseded}, "
            f"not replayable {done.unreplayable}"
        )
        await web.audit(session.who, "dlq_replay", target, result)
        session.flash.append(f"{_sentence(target)}: {result}.")
        return back

    @page(web)
    async def dead_letter(request: Request, session: Session) -> Response:
        return await show_letter(request, session, reveal=False)

    @action(web)
    async def reveal_letter(request: Request, session: Session, form: Form) -> Response:
        return await show_letter(request, session, reveal=True)

    async def show_letter(request: Request, session: Session, *, reveal: bool) -> Response:
        letter_id = request.path_params["letter_id"]
        if letter_id > MAX_ID:
            return web.render(request, "missing.html", session, 404, what=request.url.path)
        detail = await web.call(store.dead_letter_detail, letter_id)
        if detail is None:
            return web.render(
                request, "missing.html", session, 404, what=f"dead letter {letter_id}"
            )
        if reveal:
            await web.audit(
                session.who,
                "reveal",
                f"dead letter {letter_id} (customer {detail.letter.customer_id})",
                "response body and operation fields",
            )
        payload_text = json.dumps(detail.payload, indent=2, ensure_ascii=False) if reveal else ""
        return web.render(
            request,
            "dead_letter.html",
            session,
            detail=detail,
            reveal=reveal,
            payload_keys=_names(detail.payload),
            payload_text=payload_text,
            body_size=len(detail.response_body or ""),
        )

    # --- quarantine ---

    @page(web)
    async def quarantine(request: Request, session: Session) -> Response:
        dispensary = request.query_params.get("dispensary", "").strip()
        everything = request.query_params.get("all") == "1"
        rows = await web.call(
            store.quarantined,
            dispensary=dispensary or None,
            include_replayed=everything,
            limit=LIST_LIMIT,
        )
        return web.render(
            request,
            "quarantine.html",
            session,
            rows=rows,
            dispensary=dispensary,
            everything=everything,
            limit=LIST_LIMIT,
        )

    @action(web)
    async def reveal_quarantined(request: Request, session: Session, form: Form) -> Response:
        item_id = request.path_params["item_id"]
        if item_id > MAX_ID:
            return web.render(request, "missing.html", session, 404, what=request.url.path)
        found = await web.call(store.quarantined, ids=[item_id], include_replayed=True, limit=1)
        if not found:
            return web.render(request, "missing.html", session, 404, what=f"quarantined {item_id}")
        body = await web.call(store.quarantined_body, item_id)
        await web.audit(session.who, "reveal", f"quarantined body {item_id}", "body")
        return web.render(request, "quarantined.html", session, item=found[0], body=_pretty(body))

    @action(web)
    async def replay_quarantine(request: Request, session: Session, form: Form) -> Response:
        back = _back("/quarantine", form, ("dispensary",))
        dispensary = first(form, "dispensary") or None
        if first(form, "scope") == "all":
            chosen = None
            target = (
                f"all open quarantined bodies matching {_filter_text({'dispensary': dispensary})}"
            )
        else:
            chosen = ids(form)
            if not chosen:
                session.flash.append("Nothing was selected: tick the bodies to replay.")
                return back
            target = f"quarantined bodies {', '.join(map(str, chosen))}"
        # what was asked first; the store records each move with it, in the move's transaction
        await web.audit(session.who, "quarantine_replay_asked", target)
        done = await web.call(
            store.replay_quarantined,
            judge(web.config),
            dispensary=dispensary,
            ids=chosen,
            who=session.who,
        )
        result = (
            f"moved {len(done.moved)}, still refused {len(done.refused)}, skipped {done.skipped}"
        )
        session.flash.append(f"{_sentence(target)}: {result}.")
        session.flash.extend(
            f"Quarantined {qid} still refused: {why}" for qid, why in done.refused[:20]
        )
        return back

    # --- conflicts ---

    def conflict_filters(source: dict[str, str]) -> dict[str, str]:
        return {k: source.get(k, "").strip() for k in ("dispensary", "destination", "kind")}

    @page(web)
    async def conflicts(request: Request, session: Session) -> Response:
        filters = conflict_filters(dict(request.query_params))
        everything = request.query_params.get("all") == "1"
        rows = await web.call(
            store.conflict_records,
            dispensary=filters["dispensary"] or None,
            destination=filters["destination"] or None,
            kind=filters["kind"] or None,
            include_acked=everything,
            limit=LIST_LIMIT,
        )
        return web.render(
            request,
            "conflicts.html",
            session,
            rows=rows,
            filters=filters,
            everything=everything,
            limit=LIST_LIMIT,
        )

    @action(web)
    async def ack(request: Request, session: Session, form: Form) -> Response:
        filters = conflict_filters(
            {k: first(form, k) for k in ("dispensary", "destination", "kind")}
        )
        back = _back("/conflicts", form, ("dispensary", "destination", "kind"))
        everything = first(form, "scope") == "all"

        async def open_matching() -> list[int]:
            rows = await web.call(
                store.conflict_records,
                dispensary=filters["dispensary"] or None,
                destination=filters["destination"] or None,
                kind=filters["kind"] or None,
                limit=MATCH_LIMIT,
            )
            return [r.id for r in rows]

        if everything:
            chosen = await open_matching()
            target = f"all open conflicts matching {_filter_text(filters)}"
        else:
            chosen = ids(form)
            target = f"conflicts {', '.join(map(str, chosen))}"
        if not chosen:
            session.flash.append("No open conflict was selected or matches that filter.")
            return back
        # the filter is audited here; the store records the ids it acknowledged (conflicts_ack)
        await web.audit(session.who, "conflicts_ack_asked", target)
        done = await web.call(store.ack_conflicts, chosen, session.who)
        while everything and len(chosen) >= MATCH_LIMIT:  # MATCH_LIMIT at a time, to the end
            chosen = await open_matching()
            if not chosen:
                break
            done += await web.call(store.ack_conflicts, chosen, session.who)
        session.flash.append(f"{_sentence(target)}: acknowledged {done}.")
        return back

    # --- customers ---

    @page(web)
    async def find_customer(request: Request, session: Session) -> Response:
        dispensary = request.query_params.get("dispensary", "").strip()
        customer = request.query_params.get("customer_id", "").strip()
        if not customer:
            return web.render(request, "find.html", session, found=None, customer="")
        if dispensary:
            return RedirectResponse(_customer_url(dispensary, customer), status_code=303)
        found = await web.call(store.customer_dispensaries, customer)
        if len(found) == 1:
            return RedirectResponse(_customer_url(found[0], customer), status_code=303)
        return web.render(request, "find.html", session, found=found, customer=customer)

    @page(web)
    async def customer(request: Request, session: Session) -> Response:
        return await show_customer(request, session, reveal=False)

    @action(web)
    async def reveal_customer(request: Request, session: Session, form: Form) -> Response:
        return await show_customer(request, session, reveal=True)

    async def show_customer(request: Request, session: Session, *, reveal: bool) -> Response:
        dispensary = request.path_params["dispensary"]
        customer_id = request.path_params["customer_id"]
        disp = web.config.dispensaries.get(dispensary)
        names = [d.name for d in disp.destinations] if disp is not None else []
        record = await web.call(store.customer_record, dispensary, customer_id, names)
        if reveal:
            await web.audit(
                session.who, "reveal", f"customer {dispensary}/{customer_id}", "story values"
            )
        story = story_json(build_story(record, names), show_values=reveal)
        return web.render(
            request,
            "customer.html",
            session,
            story=story,
            reveal=reveal,
            dispensary=dispensary,
            customer_id=customer_id,
            known=record.state is not None or bool(record.events),
        )

    # --- audit ---

    @page(web)
    async def audit_log(request: Request, session: Session) -> Response:
        entries = await web.call(store.audit_log, 500)
        return web.render(request, "audit.html", session, entries=entries)

    return [
        Route("/", overview),
        Route("/dead-letters", dead_letters),
        Route("/dead-letters/replay", replay_letters, methods=["POST"]),
        Route("/dead-letters/{letter_id:int}", dead_letter),
        Route("/dead-letters/{letter_id:int}/reveal", reveal_letter, methods=["POST"]),
        Route("/quarantine", quarantine),
        Route("/quarantine/replay", replay_quarantine, methods=["POST"]),
        Route("/quarantine/{item_id:int}/reveal", reveal_quarantined, methods=["POST"]),
        Route("/conflicts", conflicts),
        Route("/conflicts/ack", ack, methods=["POST"]),
        Route("/customers", find_customer),
        Route(
            "/customers/{dispensary}/{customer_id:path}/reveal", reveal_customer, methods=["POST"]
        ),
        Route("/customers/{dispensary}/{customer_id:path}", customer),
        Route("/audit", audit_log),
    ]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _customer_url(dispensary: str, customer_id: str) -> str:
    return f"/customers/{quote(dispensary, safe='')}/{quote(customer_id, safe='')}"


def _names(payload: dict[str, Any]) -> list[str]:
    """The field names an operation carried (its ``fields`` when it has them), no values."""
    fields = payload.get("fields")
    if isinstance(fields, dict):
        return sorted(str(k) for k in fields)
    return sorted(str(k) for k in payload)


def _pretty(body: bytes | None) -> str:
    if body is None:
        return ""
    text = body.decode("utf-8", "replace")
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text
