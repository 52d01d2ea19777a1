"""Authentication, authorization and audit of every HTTP request, in one place.

:class:`AccessControl` is an ASGI middleware around the whole app. For each request it
finds the route that will serve it, looks the route's template and method up in
:data:`RULES` (a route without a rule is refused: deny by default), authenticates the
bearer credential (a medlake API token or an OIDC JWT) or, without one, the browser's
session cookie (:data:`SESSION_COOKIE`, see :mod:`medlake.api.login_routes`), asks
:func:`medlake.security.policy.authorize`, and records an audit record for actions on
PHI, administrative actions and every refusal. The audit record is committed before
the first byte of the response is sent; when it cannot be written the client gets 503
instead of the response.

Cross-site request forgery: the session cookie is ``SameSite=Strict``, and on top of
that a cookie-authenticated request with an unsafe method (anything but GET, HEAD,
OPTIONS) is refused (403) unless its ``Origin`` header is this server's own origin
(scheme and ``Host``); only ``POST /logout`` is exempt. Bearer requests are not
affected (a browser never adds the header on its own).

Route handlers read the outcome with :func:`principal_of` / :func:`decision_of`
(FHIR: ``decision.compartments`` must restrict what is served; only rules with
``compartments=True`` let a compartment-limited decision through).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs

import orjson
from fastapi.routing import iter_route_contexts
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request, cookie_parser
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medlake.errors import InvalidInput, MedlakeError
from medlake.ingest.archive import Archive
from medlake.security.audit import (
    ACCESS_DENIED,
    AUDITED_ACTIONS,
    AUTHENTICATION_FAILED,
    AuditEventType,
    AuditRecord,
    Outcome,
    record_audit,
)
from medlake.security.browser_login import authenticate_session
from medlake.security.errors import Unauthenticated
from medlake.security.jwt_verify import JwtVerifier, OidcConfig
from medlake.security.policy import Action, Decision, authorize
from medlake.security.principals import INSECURE_PRINCIPAL, Principal, stored_grants
from medlake.security.tokens import authenticate_token, looks_like_api_token
from medlake.types import DEFAULT_PARTITION, check_partition

log = logging.getLogger(__name__)

#: Where a rule finds the partition a request acts in: the ``{partition}`` of the path
#: (``default`` when the route has none), the ``partition`` query parameter (``None``,
#: the whole archive, when absent; or ``default`` for ``query_default``), or nowhere:
#: the action concerns the whole archive.
PartitionFrom = Literal["path", "query", "query_default", "archive"]

#: The longest credential looked at; anything longer is refused unread.
MAX_CREDENTIAL_BYTES = 16 * 1024
_SCOPE_KEY = "medlake.access"
#: The cookie of a browser session (its value: a ``mls_…`` session secret).
SESSION_COOKIE = "medlake_session"
#: Methods a cookie may authenticate from anywhere; others need a same-origin ``Origin``.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Route templates a cookie may ``POST`` to without a same-origin ``Origin``.
_CROSS_SITE_EXEMPT = frozenset({"/logout"})


@dataclass(frozen=True)
class RouteRule:
    """The action a route performs and where its partition comes from."""

    action: Action
    partition: PartitionFrom = "archive"
    #: Path parameter naming the FHIR resource type, for SMART scope checks.
    resource_type_param: str | None = None
    #: Whether the route restricts what it serves to the decision's FHIR compartments
    #: (a compartment-limited decision on any other route is refused).
    compartments: bool = False


@dataclass
class Access:
    """What the middleware decided about one request (in ``scope``)."""

    principal: Principal | None
    decision: Decision


def _dicomweb_rules() -> dict[tuple[str, str], RouteRule]:
    """The DICOMweb routes, mounted at /dicomweb and /dicomweb/partitions/{partition}."""
    s, se, i = "/studies/{study}", "/series/{series}", "/instances/{instance}"
    store = RouteRule(Action.DICOM_STORE, "path")
    search = RouteRule(Action.DICOM_SEARCH, "path")
    read = RouteRule(Action.DICOM_READ, "path")
    delete = RouteRule(Action.DICOM_DELETE, "path")
    suffixes: list[tuple[str, str, RouteRule]] = [
        ("POST", "/studies", store),
        ("POST", s, store),
        ("PUT", "/studies", store),
        ("PUT", s, store),
        ("GET", "/studies", search),
        ("GET", "/series", search),
        ("GET", "/instances", search),
        ("GET", f"{s}/series", search),
        ("GET", f"{s}/instances", search),
        ("GET", f"{s}{se}/instances", search),
        ("GET", s, read),
        ("GET", f"{s}{se}", read),
        ("GET", f"{s}{se}{i}", read),
        ("GET", f"{s}/metadata", read),
        ("GET", f"{s}{se}/metadata", read),
        ("GET", f"{s}{se}{i}/metadata", read),
        ("GET", f"{s}{se}{i}/frames/{{frame_list}}", read),
        ("GET", f"{s}{se}{i}/bulkdata/{{tag:path}}", read),
        ("GET", f"{s}{se}{i}/rendered", read),
        ("GET", f"{s}{se}{i}/frames/{{frame}}/rendered", read),
        ("GET", f"{s}{se}{i}/thumbnail", read),
        ("GET", f"{s}{se}/thumbnail", read),
        ("GET", f"{s}/thumbnail", read),
        ("DELETE", s, delete),
        ("DELETE", f"{s}{se}", delete),
        ("DELETE", f"{s}{se}{i}", delete),
        ("GET", "/wado", read),
    ]
    rules = {}
    for root in ("/dicomweb", "/dicomweb/partitions/{partition}"):
        for method, suffix, rule in suffixes:
            rules[(f"{root}{suffix}", method)] = rule
    return rules


def _fhir_rules() -> dict[tuple[str, str], RouteRule]:
    """The FHIR REST API at /fhir (partition ``default``)."""
    typed = "resource_type"
    t, i = "/fhir/{resource_type}", "/fhir/{resource_type}/{logical_id}"

    def limited(action: Action, resource_type_param: str | None = typed) -> RouteRule:
        """A route whose FHIR service honours compartments (medlake.clinical.compartments)."""
        return RouteRule(action, "path", resource_type_param, compartments=True)

    rules = {
        # The CapabilityStatement is public (SMART App Launch); the catch-all route only
        # answers 404 / 405 for what the CapabilityStatement does not list.
        ("/fhir/metadata", "GET"): RouteRule(Action.FHIR_CAPABILITIES),
        ("/fhir", "POST"): limited(Action.FHIR_TRANSACTION, None),
        ("/fhir/_history", "GET"): limited(Action.FHIR_READ, None),
        (f"{t}/_history", "GET"): limited(Action.FHIR_READ),
        (t, "GET"): limited(Action.FHIR_SEARCH),
        (f"{t}/_search", "POST"): limited(Action.FHIR_SEARCH),
        (t, "POST"): limited(Action.FHIR_CREATE),
        (t, "PUT"): limited(Action.FHIR_UPDATE),
        (t, "DELETE"): limited(Action.FHIR_DELETE),
        (f"{i}/_history", "GET"): limited(Action.FHIR_READ),
        (f"{i}/_history/{{version_id}}", "GET"): limited(Action.FHIR_READ),
        (i, "GET"): limited(Action.FHIR_READ),
        (i, "PUT"): limited(Action.FHIR_UPDATE),
        (i, "PATCH"): limited(Action.FHIR_UPDATE),
        (i, "DELETE"): limited(Action.FHIR_DELETE),
    }
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        rules[("/fhir/{rest:path}", method)] = RouteRule(Action.FHIR_CAPABILITIES)
    # Bulk Data (export, import, their jobs and files), per partition as well. An export
    # kicked off with compartments covers only them, and only such exports' status and
    # files are shown to a compartment-limited caller; $import and $merge are not limited.
    export = limited(Action.FHIR_EXPORT, None)
    status = limited(Action.FHIR_BULK_STATUS, None)
    for root in ("/fhir", "/fhir/partitions/{partition}"):
        for kick_off in ("/$export", "/Patient/$export", "/Group/{group_id}/$export"):
            rules[(root + kick_off, "GET")] = export
            rules[(root + kick_off, "POST")] = export
        rules[(f"{root}/$import", "POST")] = RouteRule(Action.FHIR_IMPORT, "path")
        rules[(f"{root}/$bulk-status/{{job_id}}", "GET")] = status
        rules[(f"{root}/$bulk-status/{{job_id}}", "DELETE")] = status
        rules[(f"{root}/$bulk-file/{{job_id}}/{{name}}", "GET")] = export
        # Patient/$merge writes both patients and re-points everything of the source.
        rules[(f"{root}/Patient/$merge", "POST")] = RouteRule(Action.FHIR_UPDATE, "path")
    return rules


def _deid_rules() -> dict[tuple[str, str], RouteRule]:
    """The de-identified views (medlake.api.deid_routes): reads only, ``deid.read``."""
    s, se, i = "/studies/{study}", "/series/{series}", "/instances/{instance}"
    dicomweb = (
        "/studies", "/series", "/instances", f"{s}/series", f"{s}/instances",
        f"{s}{se}/instances", f"{s}/metadata", f"{s}{se}/metadata", f"{s}{se}{i}/metadata",
        f"{s}{se}{i}",
    )  # fmt: skip
    read = RouteRule(Action.DEID_READ, "path")
    typed = RouteRule(Action.DEID_READ, "path", "resource_type")
    rules = {}
    for root in ("/deid/dicomweb", "/deid/dicomweb/partitions/{partition}"):
        for suffix in dicomweb:
            rules[(f"{root}{suffix}", "GET")] = read
    for root in ("/deid/fhir", "/deid/fhir/partitions/{partition}"):
        rules[(f"{root}/{{resource_type}}", "GET")] = typed
        rules[(f"{root}/{{resource_type}}/{{logical_id}}", "GET")] = typed
    return rules


def _rules() -> dict[tuple[str, str], RouteRule]:
    public_docs = RouteRule(Action.DOCS)
    rules: dict[tuple[str, str], RouteRule] = {
        # FastAPI's own documentation of the API (no data in it)
        ("/openapi.json", "GET"): public_docs,
        ("/docs", "GET"): public_docs,
        ("/docs/oauth2-redirect", "GET"): public_docs,
        ("/redoc", "GET"): public_docs,
        # health, partitions, change feed
        ("/healthz", "GET"): RouteRule(Action.HEALTH),
        ("/readyz", "GET"): RouteRule(Action.HEALTH),
        # counts per route template and partition; public with metrics_public
        ("/metrics", "GET"): RouteRule(Action.METRICS_READ),
        ("/partitions", "GET"): RouteRule(Action.PARTITION_LIST),
        ("/dicomweb/partitions", "GET"): RouteRule(Action.PARTITION_LIST),
        ("/partitions/{name}", "POST"): RouteRule(Action.PARTITION_CREATE),
        ("/changefeed", "GET"): RouteRule(Action.CHANGEFEED_READ, "query"),
        ("/changefeed/latest", "GET"): RouteRule(Action.CHANGEFEED_READ),
        # extended query tags (archive-wide) and their operations
        ("/extendedquerytags", "POST"): RouteRule(Action.TAGS_MANAGE),
        ("/extendedquerytags", "GET"): RouteRule(Action.TAGS_READ),
        ("/extendedquerytags/{path}", "GET"): RouteRule(Action.TAGS_READ),
        ("/extendedquerytags/{path}", "DELETE"): RouteRule(Action.TAGS_MANAGE),
        # the instances a tag could not index, in every partition
        ("/extendedquerytags/{path}/errors", "GET"): RouteRule(Action.TAGS_MANAGE),
        ("/operations/{operation_id}", "GET"): RouteRule(Action.OPERATION_READ),
        # ingest batches
        ("/batches", "GET"): RouteRule(Action.BATCH_READ),
        ("/batches/{batch_id}", "GET"): RouteRule(Action.BATCH_READ),
        ("/batches/{batch_id}/errors", "GET"): RouteRule(Action.BATCH_READ),
        ("/batches/{batch_id}/resume", "POST"): RouteRule(Action.BATCH_MANAGE),
        ("/batches/{batch_id}/reconcile", "POST"): RouteRule(Action.BATCH_MANAGE),
        ("/reconciliation", "GET"): RouteRule(Action.BATCH_READ, "query_default"),
        # DICOM peers
        ("/application-entities", "GET"): RouteRule(Action.AE_READ),
        ("/application-entities", "POST"): RouteRule(Action.AE_MANAGE),
        ("/application-entities/{ae_title}", "GET"): RouteRule(Action.AE_READ),
        ("/application-entities/{ae_title}", "PUT"): RouteRule(Action.AE_MANAGE),
        ("/application-entities/{ae_title}", "DELETE"): RouteRule(Action.AE_MANAGE),
        ("/application-entities/{ae_title}/echo", "POST"): RouteRule(Action.AE_MANAGE),
        # HL7 v2 messages received over MLLP (raw PHI)
        ("/hl7/messages", "GET"): RouteRule(Action.HL7_READ, "query"),
        ("/hl7/messages/{message_id}", "GET"): RouteRule(Action.HL7_READ),
        ("/hl7/messages/{message_id}/raw", "GET"): RouteRule(Action.HL7_READ),
        # who may send over MLLP, into which partition: an access list, for admins
        ("/hl7/senders", "GET"): RouteRule(Action.SECURITY_MANAGE),
        ("/hl7/senders", "POST"): RouteRule(Action.SECURITY_MANAGE),
        ("/hl7/senders/{name}", "GET"): RouteRule(Action.SECURITY_MANAGE),
        ("/hl7/senders/{name}", "PUT"): RouteRule(Action.SECURITY_MANAGE),
        ("/hl7/senders/{name}", "DELETE"): RouteRule(Action.SECURITY_MANAGE),
        # cohort queries: patients and studies by clinical and imaging data (PHI)
        ("/cohorts", "GET"): RouteRule(Action.DICOM_SEARCH, "query_default"),
        ("/cohorts", "POST"): RouteRule(Action.DICOM_SEARCH, "query_default"),
        # a browser signs in (login link or API token) for a session cookie, and out
        ("/login", "GET"): RouteRule(Action.LOGIN),
        ("/login", "POST"): RouteRule(Action.LOGIN),
        ("/logout", "POST"): RouteRule(Action.LOGOUT),
        # the OHIF viewer's static files (medlake.web mounts them at /ohif)
        ("/ohif", "GET"): RouteRule(Action.STATIC),
        ("/ohif/{rest:path}", "GET"): RouteRule(Action.STATIC),
    }
    rules.update(_dicomweb_rules())
    rules.update(_fhir_rules())
    rules.update(_deid_rules())
    return rules


#: (route path template, method) -> rule, for every route of the app. HEAD uses GET's.
RULES: dict[tuple[str, str], RouteRule] = _rules()


def rule_for(path: str, method: str) -> RouteRule | None:
    """The rule of a route template and method (HEAD as GET); ``None`` when there is none."""
    method = "GET" if method == "HEAD" else method
    return RULES.get((path, method))


def principal_of(request: Request) -> Principal | None:
    """The authenticated principal of a request (``None`` on a public route)."""
    access: Access | None = request.scope.get(_SCOPE_KEY)
    return access.principal if access else None


def decision_of(request: Request) -> Decision | None:
    """The policy decision that let the request through (with authentication off: an
    allow-everything decision without compartments)."""
    access: Access | None = request.scope.get(_SCOPE_KEY)
    return access.decision if access else None


@dataclass
class _Matched:
    path: str
    path_params: dict[str, Any] = field(default_factory=dict)


def app_routes(app: Any) -> list[Any]:
    """Every route of ``app``, included routers flattened, in the order the router tries
    them (each with its full path template, e.g. ``/dicomweb/studies/{study}``)."""
    return list(iter_route_contexts(getattr(app, "routes", [])))


def _match(routes: list[Any], scope: Scope) -> _Matched | None:
    """The route that will serve ``scope`` (the router's choice: the first full match),
    or ``None`` when none will (the router then answers 404 or 405 itself)."""
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return _Matched(str(route.path), dict(child.get("path_params", {})))
    return None


def match_route(routes: list[Any], scope: Scope) -> str | None:
    """The path template of the route of ``routes`` (see :func:`app_routes`) that will
    serve ``scope`` (``/dicomweb/studies/{study}``), or ``None`` when none will."""
    matched = _match(routes, scope)
    return matched.path if matched else None


def _partition(rule: RouteRule, matched: _Matched, query: dict[str, list[str]]) -> str | None:
    if rule.partition == "path":
        return str(matched.path_params.get("partition", DEFAULT_PARTITION))
    if rule.partition in ("query", "query_default"):
        given = query.get("partition")
        if given:
            return given[0]
        return DEFAULT_PARTITION if rule.partition == "query_default" else None
    return None


def _entity(matched: _Matched, query_string: str, action: Action) -> dict[str, str]:
    params = matched.path_params
    entity = {k: str(params[k]) for k in ("study", "series", "instance") if params.get(k)}
    if params.get("group_id"):
        entity["resource"] = f"Group/{params['group_id']}"
    resource_type = params.get("resource_type") or params.get("type")
    if resource_type:
        resource_id = params.get("id") or params.get("logical_id")
        entity["resource"] = f"{resource_type}/{resource_id}" if resource_id else str(resource_type)
    if action in (Action.DICOM_SEARCH, Action.FHIR_SEARCH, Action.CHANGEFEED_READ):
        entity["query"] = query_string
    return entity


def _recorded_partition(partition: str | None) -> str | None:
    """The partition an audit record names: what the request gave when it is a partition
    name, else none (the route answers 400; the record's request line keeps the value,
    which may be longer than the partition column)."""
    if partition is None:
        return None
    try:
        return check_partition(partition)
    except InvalidInput:
        return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def session_cookie(scope: Scope) -> str | None:
    """The value of the session cookie of a request, or ``None`` when it has none."""
    header = _header(scope, b"cookie")
    if header is None or len(header) > MAX_CREDENTIAL_BYTES:
        return None
    return cookie_parser(header).get(SESSION_COOKIE) or None


def own_origin(scope: Scope) -> str:
    """This server's origin as the request reached it: ``https://host:port``."""
    return f"{scope.get('scheme', 'http')}://{_header(scope, b'host') or ''}".lower()


def _cross_site_refusal(scope: Scope, route: str) -> str | None:
    """Why a cookie-authenticated request must be refused as possibly forged by another
    site (an unsafe method without this server's ``Origin``), or ``None``."""
    method = scope["method"]
    if method in _SAFE_METHODS or route in _CROSS_SITE_EXEMPT:
        return None
    origin, own = _header(scope, b"origin"), own_origin(scope)
    if origin is not None and origin.lower() == own:
        return None
    return (
        f"{method} with the session cookie needs Origin {own} (got {origin or 'none'}): "
        "only this server's pages may change things with the cookie; API clients send "
        "Authorization: Bearer"
    )


def _outcome(status: int) -> Outcome:
    if status < 400:
        return Outcome.SUCCESS
    return Outcome.MINOR_FAILURE if status < 500 else Outcome.SERIOUS_FAILURE


def _refusal(path: str, status: int, message: str, *, invalid_token: bool) -> list[Message]:
    """The messages of a 401 / 403 (FHIR routes: an OperationOutcome)."""
    headers = [(b"cache-control", b"no-store")]
    if path.startswith(("/fhir", "/deid/fhir")):
        code = "login" if status == 401 else "forbidden"
        body = orjson.dumps(
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": code, "diagnostics": message}],
            }
        )
        headers.append((b"content-type", b"application/fhir+json"))
    else:
        body = orjson.dumps({"status": status, "message": message})
        headers.append((b"content-type", b"application/json"))
    if status == 401:
        # RFC 6750 section 3: the scheme, and the error when a token was presented.
        challenge = 'Bearer realm="medlake"' + (', error="invalid_token"' if invalid_token else "")
        headers.append((b"www-authenticate", challenge.encode()))
    headers.append((b"content-length", str(len(body)).encode()))
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    ]


class AccessControl:
    """ASGI middleware: authenticate, authorize (by :data:`RULES`) and audit each request."""

    def __init__(self, app: ASGIApp, archive: Archive) -> None:
        self.app = app
        self.archive = archive
        self.enabled = archive.settings.auth_enabled
        oidc = OidcConfig.from_settings(archive.settings) if self.enabled else None
        self.verifier = JwtVerifier(oidc) if oidc else None
        # Actions the settings open to anyone (e.g. a Prometheus without a token).
        self.public: set[Action] = (
            {Action.METRICS_READ} if archive.settings.metrics_public else set()
        )
        self._flat: tuple[int, list[Any]] = (-1, [])

    def _routes(self, app: Any) -> list[Any]:
        # Flattened once, again only when routes were added (the viewer mounts after).
        count = len(getattr(app, "routes", []))
        if self._flat[0] != count:
            self._flat = (count, app_routes(app))
        return self._flat[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI call (only HTTP requests are checked)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.enabled:
            # Authentication off (local demos): everyone is an admin and nothing is audited.
            decision = Decision(True, Action.HEALTH, None, "authentication is off")
            scope[_SCOPE_KEY] = Access(INSECURE_PRINCIPAL, decision)
            await self.app(scope, receive, send)
            return
        matched = _match(self._routes(scope.get("app")), scope)
        if matched is None:
            await self.app(scope, receive, send)  # 404 / 405 from the router, no data
            return
        method = scope["method"]
        query_string = scope.get("query_string", b"").decode("latin-1")
        rule = rule_for(matched.path, method)
        principal: Principal | None = None
        presented = False
        try:
            credential = self._credential(scope)
            presented = credential is not None
            if credential is not None:
                principal = await run_in_threadpool(self._authenticate, credential)
        except Unauthenticated as exc:
            await self._refuse(scope, send, None, rule, matched, 401, exc.message, presented)
            return
        # Without a bearer credential, a browser's session cookie (the bearer wins).
        cookie = session_cookie(scope) if credential is None else None
        ended_session: str | None = None
        if cookie is not None:
            try:
                principal = await run_in_threadpool(
                    authenticate_session, self.archive.engine, cookie
                )
            except Unauthenticated as exc:
                ended_session = f"{exc.message}: sign in again at /login"
            else:
                forged = _cross_site_refusal(scope, matched.path)
                if forged is not None:
                    await self._refuse(scope, send, principal, rule, matched, 403, forged, False)
                    return
        if rule is None:
            message = f"no access rule for {method} {matched.path}: refused"
            status = 403 if principal is not None else 401
            await self._refuse(scope, send, principal, None, matched, status, message, presented)
            return
        partition = _partition(rule, matched, parse_qs(query_string))
        resource_type = (
            matched.path_params.get(rule.resource_type_param) if rule.resource_type_param else None
        )
        decision = authorize(principal, rule.action, partition, resource_type=resource_type)
        if rule.action in self.public:
            decision = Decision(True, rule.action, partition, "public by the settings")
        if not decision.allowed:
            status = 401 if not decision.authenticated else 403
            reason = decision.reason if decision.authenticated else ended_session or decision.reason
            await self._refuse(scope, send, principal, rule, matched, status, reason, presented)
            return
        if decision.compartments is not None and not rule.compartments:
            # Only the FHIR routes restrict what they serve to compartments: elsewhere a
            # grant limited to one patient's compartment must not open the whole partition.
            reason = (
                f"{decision.reason}: compartment-limited access "
                f"({', '.join(sorted(decision.compartments))}) is not supported for "
                f"{rule.action.value} on this route"
            )
            await self._refuse(scope, send, principal, rule, matched, 403, reason, presented)
            return
        scope[_SCOPE_KEY] = Access(principal, decision)
        event = AUDITED_ACTIONS.get(rule.action)
        if event is None or principal is None:
            await self.app(scope, receive, send)
            return

        # Configuration requests take their EventActionCode from the method (R, C, U, D).
        code = (
            {"GET": "R", "POST": "C", "PUT": "U", "DELETE": "D"}.get(method)
            if event.subtype
            else None
        )

        def record(status: int, detail: str | None) -> AuditRecord:
            return self._record(
                scope, principal, event, rule.action, partition, matched, query_string,
                _outcome(status), detail or f"HTTP {status}", code,
            )  # fmt: skip

        await self._call_audited(scope, receive, send, record)

    # -- pieces -----------------------------------------------------------------------------

    @staticmethod
    def _credential(scope: Scope) -> str | None:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                if len(value) > MAX_CREDENTIAL_BYTES:
                    raise Unauthenticated("the Authorization header is too long")
                text: str = value.decode("latin-1")
                scheme, _, credential = text.partition(" ")
                if scheme.lower() != "bearer" or not credential.strip():
                    raise Unauthenticated("use Authorization: Bearer <token>")
                return credential.strip()
        return None

    def _authenticate(self, credential: str) -> Principal:
        engine = self.archive.engine
        if looks_like_api_token(credential):
            return authenticate_token(engine, credential)
        if self.verifier is None:
            raise Unauthenticated("not a medlake API token, and no OIDC issuer is configured")

        def stored(subject: str) -> frozenset[Any]:
            with engine.connect() as conn:
                return stored_grants(conn, subject)

        return self.verifier.principal(credential, stored)

    def _record(
        self,
        scope: Scope,
        principal: Principal | None,
        event: AuditEventType,
        action: Action | None,
        partition: str | None,
        matched: _Matched,
        query_string: str,
        outcome: Outcome,
        detail: str | None,
        action_code: str | None = None,
    ) -> AuditRecord:
        method, path = scope["method"], scope["path"]
        client = scope.get("client")
        request = f"{method} {path}" + (f"?{query_string}" if query_string else "")
        entity = _entity(matched, query_string, action) if action else {}
        return AuditRecord(
            event=event,
            action=action_code,
            operation=action.value if action else "unknown",
            actor=principal.subject if principal else "anonymous",
            actor_kind=principal.kind.value if principal else "none",
            actor_name=principal.display_name if principal else None,
            source_address=client[0] if client else None,
            partition=_recorded_partition(partition),
            entity=entity,
            request=request,
            outcome=outcome,
            detail=detail,
        )

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        principal: Principal | None,
        rule: RouteRule | None,
        matched: _Matched,
        status: int,
        message: str,
        presented: bool,
    ) -> None:
        """Answer 401 / 403 and audit the refusal (an unwritable audit record: 503)."""
        event = AUTHENTICATION_FAILED if status == 401 else ACCESS_DENIED
        action = rule.action if rule else None
        query_string = scope.get("query_string", b"").decode("latin-1")
        partition = _partition(rule, matched, parse_qs(query_string)) if rule else None
        record = self._record(
            scope, principal, event, action, partition, matched, query_string,
            Outcome.MINOR_FAILURE, message,
        )  # fmt: skip
        try:
            await run_in_threadpool(record_audit, self.archive.engine, record)
        except MedlakeError as exc:
            status, message = exc.http_status, exc.message
        for out in _refusal(scope["path"], status, message, invalid_token=presented):
            await send(out)

    async def _call_audited(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: Callable[[int, str | None], AuditRecord],
    ) -> None:
        """Run the app; commit the audit record before the response starts."""
        state = {"started": False, "swallow": False}

        async def audited_send(message: Message) -> None:
            if state["swallow"]:
                return
            if message["type"] == "http.response.start" and not state["started"]:
                state["started"] = True
                try:
                    await run_in_threadpool(
                        record_audit, self.archive.engine, record(message["status"], None)
                    )
                except MedlakeError as exc:
                    # No audit record, no response: the client learns the request failed.
                    # Not the path: it holds UIDs and FHIR resource ids.
                    log.error("audit record not written; %s request refused", scope["method"])
                    state["swallow"] = True
                    body = orjson.dumps({"status": exc.http_status, "message": exc.message})
                    await send(
                        {
                            "type": "http.response.start",
                            "status": exc.http_status,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except Exception as exc:
            if not state["started"]:
                # The error middleware outside answers 500; the attempt is recorded first.
                detail = f"failed: {exc.__class__.__name__}"
                await run_in_threadpool(record_audit, self.archive.engine, record(500, detail))
            raise


__all__ = [
    "RULES",
    "SESSION_COOKIE",
    "AccessControl",
    "PartitionFrom",
    "RouteRule",
    "app_routes",
    "decision_of",
    "match_route",
    "own_origin",
    "principal_of",
    "rule_for",
    "session_cookie",
]
