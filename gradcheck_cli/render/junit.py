"""--format junit: JUnit XML, the test-report format every CI system reads (GitLab, Jenkins, Azure, GitHub
reporters).

One testcase per layer, named by the layer, in forward order. Each finding that fails the run under
--fail-on/--fail-level is a <failure> of that testcase (the worst first: tools that show one show that one);
the findings that do not fail it are listed in the testcase's <system-out>. Frozen layers are <skipped>.
Findings on the loss itself are a testcase named "<loss>".
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from gradcheck_cli.gate import Gate
from gradcheck_cli.render.common import display_name, status_text
from gradcheck_cli.render.rows import in_forward_order
from gradcheck_cli.report import Finding, Report

# XML 1.0 cannot hold most control characters, not even escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _text(value: object) -> str:
    return _NOT_XML.sub("?", str(value))


def render(report: Report, gate: Gate) -> str:
    ordered = in_forward_order(report.layers)
    cases: list[tuple[str, list[Finding], bool]] = [
        (layer.name, [f for f in report.findings if f.covers(layer.name)], layer.frozen) for layer in ordered
    ]
    known = {layer.name for layer in report.layers}
    for other in dict.fromkeys(f.layer for f in report.findings if f.layer not in known):
        cases.append((other, [f for f in report.findings if f.layer == other], False))

    failures = sum(any(gate.fails(f) for f in findings) for _, findings, _ in cases)
    skipped = sum(frozen for _, _, frozen in cases)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0", "skipped": str(skipped)}
    root = ET.Element("testsuites", {"name": "gradcheck", **counts, "time": "0"})
    suite = ET.SubElement(root, "testsuite", {"name": "gradcheck", **counts, "time": "0"})
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("model", report.model),
        ("target", report.target or ""),
        ("healthy", str(report.healthy).lower()),
        ("steps", report.steps),
        ("batch_size", report.batch_size),
        ("loss", report.loss_name),
        ("seed", report.seed),
        ("device", report.device),
        ("torch_version", report.torch_version),
        ("fail_on", ",".join(gate.fail_on)),
        ("fail_level", gate.fail_level),
    ):
        ET.SubElement(properties, "property", {"name": name, "value": _text(value)})

    classname = f"gradcheck.{report.model}"
    for name, findings, frozen in cases:
        case = ET.SubElement(
            suite, "testcase", {"classname": _text(classname), "name": _text(display_name(name)), "time": "0"}
        )
        failed = sorted((f for f in findings if gate.fails(f)), key=lambda f: f.severity != "error")
        for finding in failed:
            failure = ET.SubElement(
                case,
                "failure",
                {"type": finding.kind, "message": _text(f"{finding.kind} [{finding.view}]: {finding.message}")},
            )
            failure.text = _text(_describe(finding, report))
        if frozen and not findings:
            ET.SubElement(case, "skipped", {"message": "frozen: no trainable parameters"})
        others = [f for f in findings if not gate.fails(f)]
        if others:
            out = ET.SubElement(case, "system-out")
            out.text = _text("\n\n".join(_describe(f, report) for f in others))
        elif not failed and not frozen:
            layer = next((layer for layer in report.layers if layer.name == name), None)
            if layer is not None:
                out = ET.SubElement(case, "system-out")
                out.text = _text(f"{status_text(layer, report.findings)}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _describe(finding: Finding, report: Report) -> str:
    lines = [
        f"{finding.severity} {finding.kind} [{finding.view}] in {display_name(finding.layer)}: {finding.message}",
        f"fix: {finding.fix}",
    ]
    if finding.kind == "nan" and report.nan_origin is not None:
        lines.append(f"NaN origin: {report.nan_origin.detail}")
    return "\n".join(lines)
