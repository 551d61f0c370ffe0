"""The mapping's written ``apply`` picks an element of a list (``addresses[primary=true]``)
once for every field reading it (connector/mapping/_engine.py _inline_path): over customers
whose addresses are null, empty, without or with several primaries, or odd, it maps as each
field's ``run`` in turn does, failures included."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_perf_mapping_apply import customer, outcome, reference

from connector.mapping import compile_mapping_text

PICKING = compile_mapping_text(
    """
street: {from: "addresses[primary=true].street1", transform: [strip, title]}
first_city: "addresses[0].city"
city: {from: "addresses[primary=true].city", transform: [strip, upper]}
state: {from: "addresses[primary=true].state", on_null: send}
zip_as_number: {from: "addresses[primary=true].zipcode", transform: [int]}
last_city: "addresses[-1].city"
same_first: "addresses[0].zipcode"
typed: "addresses[type=address_of_record].city"
group: "customer_groups[0]"
other_group: "customer_groups[-1]"
""",
    name="picking",
)
TEXT = st.one_of(
    st.none(), st.sampled_from(["", "N/A", " 90301 ", "x1", "12"]), st.text(max_size=4)
)
ADDRESS = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(TEXT, st.just("address_of_record")),
        "street1": TEXT,
        "city": TEXT,
        "state": TEXT,
        "zipcode": TEXT,
        "primary": st.one_of(st.none(), st.booleans()),
    },
)


@given(
    addresses=st.one_of(st.none(), st.lists(ADDRESS, max_size=3)),
    groups=st.one_of(st.none(), st.lists(TEXT.filter(lambda t: t is not None), max_size=2)),
)
@settings(max_examples=400, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_picked_once_maps_as_each_fields_run(addresses: Any, groups: Any) -> None:
    who = customer(addresses=addresses, customer_groups=groups)
    got = outcome(PICKING.apply, who, "store-1")
    assert got == outcome(reference, PICKING, who, "store-1")
    if got[0] == "mapped":
        assert repr(got[1]) == repr(reference(PICKING, who, "store-1"))
