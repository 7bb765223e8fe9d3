"""The load report says why requests failed: grouped by status and message."""
from services.loadgen import report as rep
from services.loadgen.report import RequestResult, failure_reasons, format_report, summarize


def r(i, code, message="", latency=0.1):
    return RequestResult(i, code, latency, 1.5, message=message)


def test_failures_are_grouped_by_status_and_message_most_frequent_first():
    results = [r(0, "OK"), r(1, "OK"),
               r(2, "UNAVAILABLE", "no plan yet; retry later"),
               r(3, "UNAVAILABLE", "no plan yet; retry later"),
               r(4, "UNAVAILABLE", "no plan yet; retry later"),
               r(5, "DEADLINE_EXCEEDED", "the request's deadline leaves 12 ms, less than the 20 ms"),
               r(6, "DEADLINE_EXCEEDED", "the request's deadline leaves 7 ms, less than the 20 ms"),
               r(7, rep.IN_FLIGHT_CAP, latency=None),
               r(8, "INTERNAL")]
    got = failure_reasons(results)
    assert got == {
        "UNAVAILABLE: no plan yet; retry later": 3,
        # equal but for their numbers: one group, the first message shown
        "DEADLINE_EXCEEDED: the request's deadline leaves 12 ms, less than the 20 ms": 2,
        f"{rep.IN_FLIGHT_CAP}: {rep.CLIENT_MESSAGES[rep.IN_FLIGHT_CAP]}": 1,
        "INTERNAL": 1,
    }
    assert sum(got.values()) == 9 - 2   # every request not answered OK, once


def test_the_report_prints_the_reasons_and_keeps_them_in_the_json():
    results = [r(0, "OK")] + [r(i, "UNAVAILABLE", "a pipeline stage is unavailable; retry later (at stage 'rec')")
                              for i in range(1, 5)]
    report = summarize(results, elapsed_s=1.0, window_s=1.0)
    text = format_report(report)
    assert "why requests failed (status: message):" in text
    assert "       4   80.00 %  UNAVAILABLE: a pipeline stage is unavailable; retry later (at stage 'rec')" in text
    assert report.to_dict()["failure_reasons"] == {
        "UNAVAILABLE: a pipeline stage is unavailable; retry later (at stage 'rec')": 4}


def test_many_reasons_are_cut_to_the_most_frequent_with_the_rest_counted():
    results = [r(i, "UNAVAILABLE", f"reason {chr(97 + i)}") for i in range(12)]
    text = format_report(summarize(results, elapsed_s=1.0, window_s=1.0))
    assert text.count("UNAVAILABLE: reason") == rep.FAILURE_GROUPS_SHOWN
    assert "       4   33.33 %  (4 other reasons; all in the JSON report)" in text   # 12 - 8


def test_no_failures_no_section():
    assert "why requests failed" not in format_report(summarize([r(0, "OK")], elapsed_s=1.0, window_s=1.0))
