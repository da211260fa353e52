"""Browser sign-in in api_keys mode: a key posted once buys a session cookie (HttpOnly,
SameSite=Lax, Secure over https, expiring; never the key), sign-out, pages that send a
visitor without a session to sign in, CSRF tokens on every state-changing request made with
the cookie, and owners kept apart through the cookie as through the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from tests.service_support import (
    create_api_key,
    insert_job,
    png_bytes,
    upload_zip,
    use_settings,
    zip_bytes,
)

TTL_S = 3600


@pytest.fixture
def keyed_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "AUTH_MODE": "api_keys",
        "SESSION_TTL_S": str(TTL_S),
    }
    use_settings(monkeypatch, **env)
    return env


@pytest.fixture
def app(keyed_env: dict[str, str]) -> Iterator[Any]:
    from app.main import create_app

    application = create_app()
    with TestClient(application):  # runs the start-up (migrations) once
        yield application


@pytest.fixture
def keys(app: Any) -> dict[str, str]:
    return {"alice": create_api_key("alice"), "bob": create_api_key("bob")}


def _browser(app: Any, base_url: str = "http://testserver") -> TestClient:
    return TestClient(app, base_url=base_url, follow_redirects=False)


def _sign_in(client: TestClient, key: str, next_path: str = "/") -> Any:
    return client.post("/sign-in", data={"key": key, "next": next_path})


def _set_cookie(response: Any) -> Any:
    cookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie["scan_session"]


def _csrf(client: TestClient) -> str:
    page = client.get("/")
    assert page.status_code == 200, page.text
    marker = '<meta name="csrf-token" content="'
    token = page.text.split(marker, 1)[1].split('"', 1)[0]
    assert len(token) == 64
    return token


def _rows(model: Any) -> list[Any]:
    from app.db.session import session_scope

    with session_scope() as session:
        return list(session.scalars(select(model)))


def test_sign_in_sets_a_safe_expiring_cookie_that_is_not_the_key(
    app: Any, keys: dict[str, str]
) -> None:
    from app.db.models import BrowserSession

    with _browser(app) as browser:
        assert "API key" in browser.get("/sign-in").text
        response = _sign_in(browser, keys["alice"], "/jobs/abc/gallery?c=6")
        assert response.status_code == 303
        assert response.headers["location"] == "/jobs/abc/gallery?c=6"
        cookie = _set_cookie(response)
        header = response.headers["set-cookie"].lower()
        assert "httponly" in header and "samesite=lax" in header and "secure" not in header
        assert cookie["max-age"] == str(TTL_S) and cookie["path"] == "/"
        token = cookie.value
        assert keys["alice"] not in token and keys["alice"].split("_", 2)[2] not in token
        (row,) = _rows(BrowserSession)
        assert token not in (row.token_hash, row.id)  # only its hash is stored
        assert browser.get("/api/v1/datasets").status_code == 200
        assert 'id="signed-in-as">alice<' in browser.get("/").text

    with _browser(app, "https://testserver") as browser:
        assert "secure" in _sign_in(browser, keys["alice"]).headers["set-cookie"].lower()


def test_the_cookie_is_secure_when_configured(
    keyed_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    use_settings(monkeypatch, **keyed_env, SESSION_COOKIE_SECURE="true")
    with _browser(create_app()) as browser:
        key = create_api_key("carol")
        assert "secure" in _sign_in(browser, key).headers["set-cookie"].lower()


def test_a_wrong_or_revoked_key_signs_no_one_in(app: Any, keys: dict[str, str]) -> None:
    from app.auth import revoke_key
    from app.db.session import session_scope

    with _browser(app) as browser:
        for wrong in ("", "nonsense", keys["alice"][:-2] + "xx"):
            response = _sign_in(browser, wrong)
            assert response.status_code == 401
            assert "not valid" in response.text and "set-cookie" not in response.headers
        with session_scope() as session:
            assert revoke_key(session, keys["bob"].split("_")[1])
        assert _sign_in(browser, keys["bob"]).status_code == 401


def test_pages_send_a_visitor_without_a_session_to_sign_in(app: Any) -> None:
    with _browser(app) as browser:
        for path in ("/", "/jobs/abc", "/jobs/abc/gallery?c=6"):
            response = browser.get(path)
            assert response.status_code == 303
            assert response.headers["location"].startswith("/sign-in?next=")
        assert browser.get("/sign-in?next=%2Fjobs%2Fabc").text.count('value="/jobs/abc"') == 1
        assert browser.get("/api/v1/datasets").status_code == 401  # the API answers, no redirect


def test_no_redirect_off_the_site(app: Any, keys: dict[str, str]) -> None:
    with _browser(app) as browser:
        for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "x"):
            assert _sign_in(browser, keys["alice"], target).headers["location"] == "/"


def test_an_expired_session_ends(app: Any, keys: dict[str, str]) -> None:
    from app.db.models import BrowserSession, utcnow
    from app.db.session import session_scope

    with _browser(app) as browser:
        _sign_in(browser, keys["alice"])
        assert browser.get("/api/v1/datasets").status_code == 200
        with session_scope() as session:
            session.execute(
                update(BrowserSession).values(expires_at=utcnow() - timedelta(seconds=1))
            )
        response = browser.get("/api/v1/datasets")
        assert response.status_code == 401 and "sign in again" in response.json()["detail"]
        assert browser.get("/").headers["location"].startswith("/sign-in")


def test_sign_out_ends_the_session_for_every_copy_of_the_cookie(
    app: Any, keys: dict[str, str]
) -> None:
    with _browser(app) as browser:
        token = _set_cookie(_sign_in(browser, keys["alice"])).value
        csrf = _csrf(browser)
        assert browser.post("/sign-out", data={"csrf_token": "0" * 64}).status_code == 403
        response = browser.post("/sign-out", data={"csrf_token": csrf})
        assert response.status_code == 303 and response.headers["location"] == "/sign-in"
        assert 'scan_session=""' in response.headers["set-cookie"]
    with _browser(app) as copy:
        copy.cookies.set("scan_session", token)
        assert copy.get("/api/v1/datasets").status_code == 401


def test_revoking_the_key_ends_its_sessions(app: Any, keys: dict[str, str]) -> None:
    from app.auth import revoke_key
    from app.db.session import session_scope

    with _browser(app) as browser:
        _sign_in(browser, keys["alice"])
        assert browser.get("/api/v1/datasets").status_code == 200
        with session_scope() as session:
            revoke_key(session, keys["alice"].split("_")[1])
        assert browser.get("/api/v1/datasets").status_code == 401


def test_state_changing_requests_with_the_cookie_need_the_csrf_token(
    app: Any, keys: dict[str, str]
) -> None:
    payload = zip_bytes({f"a/{i}.png": png_bytes(colour=(i * 40, 10, 10)) for i in range(4)})
    with _browser(app) as browser:
        _sign_in(browser, keys["alice"])
        csrf = _csrf(browser)
        refused = upload_zip(browser, payload)
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
        assert upload_zip(browser, payload, headers={"X-CSRF-Token": "f" * 64}).status_code == 403
        body = {"dataset_id": "nope", "num_clusters": 2, "preset": "tiny"}
        assert browser.post("/api/v1/jobs", json=body).status_code == 403
        assert browser.get("/api/v1/datasets").json()["total"] == 0  # nothing was stored

        stored = upload_zip(browser, payload, headers={"X-CSRF-Token": csrf})
        assert stored.status_code == 201, stored.text
        answer = browser.post("/api/v1/jobs", json=body, headers={"X-CSRF-Token": csrf})
        assert answer.status_code == 404  # past the CSRF check: the dataset does not exist

    with _browser(app) as script:  # a key header is no cookie: another site cannot send it
        headers = {"Authorization": f"Bearer {keys['alice']}"}
        assert script.post("/api/v1/jobs", json=body, headers=headers).status_code == 404


def test_other_sites_cannot_post_the_sign_in_form(app: Any, keys: dict[str, str]) -> None:
    with _browser(app) as browser:
        for headers in (
            {"Origin": "https://evil.example"},
            {"Sec-Fetch-Site": "cross-site"},
        ):
            response = browser.post(
                "/sign-in", data={"key": keys["alice"], "next": "/"}, headers=headers
            )
            assert response.status_code == 403 and "set-cookie" not in response.headers
        same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
        response = browser.post("/sign-in", data={"key": keys["alice"]}, headers=same)
        assert response.status_code == 303


def test_a_session_sees_only_its_owners_data(app: Any, keys: dict[str, str]) -> None:
    from app.db.models import Owner
    from scan_engine.config import make_config

    payload = zip_bytes({f"a/{i}.png": png_bytes(colour=(10, i * 40, 10)) for i in range(4)})
    with _browser(app) as alice, _browser(app) as bob:
        _sign_in(alice, keys["alice"])
        _sign_in(bob, keys["bob"])
        dataset = upload_zip(alice, payload, headers={"X-CSRF-Token": _csrf(alice)}).json()
        images = alice.get(f"/api/v1/datasets/{dataset['id']}/images").json()["items"]
        image_url = f"/api/v1/datasets/{dataset['id']}/images/{images[0]['id']}"
        owner_id = next(o.id for o in _rows(Owner) if o.name == "alice")
        config = make_config("tiny", num_clusters=2)
        job_id = insert_job(
            {
                "owner_id": owner_id,
                "dataset_id": dataset["id"],
                "status": "queued",
                "num_clusters": 2,
                "overcluster": None,
                "cluster_counts": config.cluster_counts(),
                "preset": "tiny",
                "overrides": {},
                "config": config.to_json_dict(),
            }
        )

        assert alice.get(image_url).status_code == 200
        assert alice.get(image_url).headers["content-type"].startswith("image/")
        assert alice.get(f"/jobs/{job_id}").status_code == 200
        assert alice.get(f"/jobs/{job_id}/gallery").status_code == 200

        assert bob.get(f"/api/v1/datasets/{dataset['id']}").status_code == 404
        assert bob.get(image_url).status_code == 404
        assert bob.get(f"/api/v1/jobs/{job_id}").status_code == 404
        assert bob.get(f"/jobs/{job_id}").status_code == 404
        assert bob.get(f"/jobs/{job_id}/gallery").status_code == 404
        assert bob.get("/api/v1/datasets").json()["total"] == 0
        cancel = bob.post(f"/api/v1/jobs/{job_id}/cancel", headers={"X-CSRF-Token": _csrf(bob)})
        assert cancel.status_code == 404


def test_single_user_mode_has_no_sign_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.main import create_app

    use_settings(monkeypatch, DATA_DIR=str(tmp_path / "data"))
    with _browser(create_app()) as browser:
        assert browser.get("/sign-in").headers["location"] == "/"
        page = browser.get("/")
        assert page.status_code == 200 and "sign-out" not in page.text
        assert '<meta name="csrf-token" content="">' in page.text
