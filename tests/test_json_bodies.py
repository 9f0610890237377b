"""A CRM answer's JSON body (ApiClient.parse_json): read by orjson from the body's bytes, with the standard
decoder taking what orjson refuses, so that the bodies accepted and their values are those of response.json()."""

from __future__ import annotations

import codecs

import pytest
import requests

from oppsync_pipeline.lib.crm.http import ApiClient, CrmError


def answer(body: bytes, content_type: str = "application/json") -> requests.Response:
    response = requests.Response()
    response.status_code = 200
    response._content = body
    response.headers["Content-Type"] = content_type
    response.url = "https://crm.example/api/opportunities"
    response.request = requests.Request("GET", response.url).prepare()
    return response


@pytest.mark.parametrize(
    "body",
    [
        '{"value": [{"id": 1, "name": "Zürich – 東京 🚀", "amount": 1234.5, "none": null, "ok": true}]}'.encode(),
        b'{"records": [], "nextRecordsUrl": "/q/01g-2000", "big": 9007199254740993, "tiny": 1e-300}',
        b'{"escaped": "tab\\t quote\\" nul\\u0000 pair\\ud83d\\ude80"}',
        codecs.BOM_UTF8 + b'{"bom": 1}',  # orjson refuses a BOM, the standard decoder skips it
        b'{"nan": NaN}',  # not JSON: refused or taken, as response.json() does
        b'{"lone": "\\ud800"}',  # a lone surrogate: orjson refuses it
    ],
)
def test_bodies_read_as_response_json_reads_them(body: bytes):
    try:
        expected = answer(body).json()
    except ValueError:
        with pytest.raises(CrmError, match="not valid JSON"):
            ApiClient.parse_json(answer(body))
        return
    assert repr(ApiClient.parse_json(answer(body))) == repr(expected)  # repr: NaN is not equal to itself


@pytest.mark.parametrize("body", [b'{"value": [1, 2', b"<html>Service Unavailable</html>", b""])
def test_a_body_that_is_not_json_fails_the_run(body: bytes):
    with pytest.raises(CrmError, match="not valid JSON") as err:
        ApiClient.parse_json(answer(body))
    assert err.value.code == "MALFORMED_BODY"
