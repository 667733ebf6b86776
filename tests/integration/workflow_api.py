"""Convert a UI-format workflow (what the ComfyUI frontend saves) into an API-format prompt.

The frontend does this in the browser (``graphToPrompt``); here it is done from the saved JSON and a
server's ``GET /object_info``, which is the truth for every node's input names and order:

* ``widgets_values`` is positional over the node's *widget* inputs — required then optional, in
  ``input_order`` — where a widget input is a primitive (INT, FLOAT, STRING, BOOLEAN, COMBO or a
  list of options) that is not ``forceInput``. An INT (or COMBO) widget with
  ``control_after_generate`` in its options, or an INT named ``seed``/``noise_seed`` (the
  frontend's legacy rule), is followed by one extra UI-only value ("fixed", "randomize", …).
* each linked input becomes ``[source node id, source output slot]`` (a link overrides the
  widget value of a widget turned into an input); links through ``Reroute`` nodes are followed.
* UI-only nodes (``Note``, ``MarkdownNote``, ``Reroute``, ``PrimitiveNode``) are dropped; a
  PrimitiveNode's value is written into the widgets it feeds. Muted nodes (mode 2) are dropped;
  bypassed nodes (mode 4) are not supported and raise.
"""

from __future__ import annotations

from typing import Any, Mapping

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UI_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
LEGACY_SEED_NAMES = frozenset({"seed", "noise_seed"})


class WorkflowError(ValueError):
    pass


def _ordered_inputs(info: Mapping[str, Any]) -> list[tuple[str, list]]:
    """(name, spec) for required then optional inputs, in ``input_order`` when the server gives it."""
    out: list[tuple[str, list]] = []
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        specs = (info.get("input") or {}).get(section) or {}
        names = order.get(section) or list(specs)
        out.extend((name, specs[name]) for name in names if name in specs)
    return out


def _options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list) -> bool:
    kind = spec[0]
    if _options(spec).get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_slots(info: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """The node's ``widgets_values`` layout: (input name or None for a UI-only value, type)."""
    slots: list[tuple[str | None, str]] = []
    for name, spec in _ordered_inputs(info):
        if not is_widget(spec):
            continue
        kind = "COMBO" if isinstance(spec[0], list) else spec[0]
        slots.append((name, kind))
        opts = _options(spec)
        control = opts.get("control_after_generate")
        if control is None and kind == "INT":
            control = name in LEGACY_SEED_NAMES
        if control and kind in ("INT", "COMBO"):
            slots.append((None, "control_after_generate"))
    return slots


def widget_values(node: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """Map a UI node's ``widgets_values`` onto input names."""
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some frontends save {name: value}
        return {k: v for k, v in values.items() if any(k == n for n, _ in _ordered_inputs(info))}
    slots = widget_slots(info)
    if len(values) != len(slots):
        raise WorkflowError(
            f"node {node.get('id')} ({node.get('type')}): {len(values)} widgets_values {values!r} but the server "
            f"lists {len(slots)} widget slots {[n or '<control_after_generate>' for n, _ in slots]}"
        )
    return {name: value for (name, _), value in zip(slots, values) if name is not None}


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict]:
    """The API-format prompt ``{node id: {"class_type", "inputs", "_meta"}}`` of a UI workflow."""
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links: dict[int, tuple[int, int, int, int]] = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            lid, src, slot, dst, dslot = (link["id"], link["origin_id"], link["origin_slot"],
                                          link["target_id"], link["target_slot"])
        else:
            lid, src, slot, dst, dslot = link[:5]
        links[int(lid)] = (int(src), int(slot), int(dst), int(dslot))
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter")

    def source(link_id: int) -> tuple[int, int] | None:
        """Follow Reroutes back to a real output; None for a link from a PrimitiveNode."""
        seen = set()
        while True:
            if link_id not in links:
                raise WorkflowError(f"link {link_id} is used by a node but missing from 'links'")
            src, slot, _, _ = links[link_id]
            node = nodes.get(src)
            if node is None:
                raise WorkflowError(f"link {link_id} starts at missing node {src}")
            if node["type"] == "Reroute":
                if src in seen:
                    raise WorkflowError(f"Reroute loop at node {src}")
                seen.add(src)
                upstream = (node.get("inputs") or [{}])[0].get("link")
                if upstream is None:
                    raise WorkflowError(f"Reroute node {src} has no input")
                link_id = int(upstream)
                continue
            if node["type"] == "PrimitiveNode":
                return None
            if node.get("mode", 0) == 2:
                raise WorkflowError(f"node {src} ({node['type']}) is muted but feeds link {link_id}")
            return src, slot

    prompt: dict[str, dict] = {}
    for nid, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in UI_ONLY or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise WorkflowError(f"node {nid} ({kind}) is bypassed; bypass is not supported by this converter")
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {nid}: type {kind!r} is not known to this ComfyUI (not in /object_info)")
        inputs: dict[str, Any] = dict(widget_values(node, info))
        known = dict(_ordered_inputs(info))
        for slot in node.get("inputs") or []:
            name, link_id = slot.get("name"), slot.get("link")
            if link_id is None:
                continue
            if name not in known:
                widget = (slot.get("widget") or {}).get("name")
                if widget in known:
                    name = widget
                else:
                    raise WorkflowError(f"node {nid} ({kind}): input {name!r} is not an input of {kind}")
            src = source(int(link_id))
            if src is None:  # a PrimitiveNode: its first widget value is the value
                prim = nodes[links[int(link_id)][0]]
                inputs[name] = (prim.get("widgets_values") or [None])[0]
            else:
                inputs[name] = [str(src[0]), src[1]]
        missing = [n for n, spec in _ordered_inputs(info)
                   if n in ((info.get("input") or {}).get("required") or {}) and n not in inputs]
        if missing:
            raise WorkflowError(f"node {nid} ({kind}): required inputs {missing} have neither a link nor a widget value")
        prompt[str(nid)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title") or kind}}
    return prompt


def set_inputs(prompt: dict[str, dict], class_type: str, **values: Any) -> int:
    """Override widget values of every node of ``class_type`` whose input is not linked; count nodes."""
    count = 0
    for node in prompt.values():
        if node["class_type"] != class_type:
            continue
        count += 1
        for name, value in values.items():
            if name in node["inputs"] and isinstance(node["inputs"][name], list):
                continue  # linked
            node["inputs"][name] = value
    return count
