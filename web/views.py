"""The operators' pages: each renders a template; the data comes from the API and `/ws/live`.

Sign-in is checked before these handlers run (the hub's middleware redirects to /signin),
so each only picks its template. What a session may do decides which actions are drawn;
the API refuses the rest anyway.
"""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from hub import __version__
from hub.keys import SESSION

routes = web.RouteTableDef()


def render(request: web.Request, template: str, **context: Any) -> web.Response:
    """Render `template` with the session, what it may do and the hub version added."""
    session = request[SESSION]
    scopes = session.scopes
    return aiohttp_jinja2.render_template(
        template,
        request,
        {
            "session": session,
            "can_write": "hub:write" in scopes,
            "can_admin": "hub:admin" in scopes,
            "version": __version__,
            **context,
        },
    )


@routes.get("/")
async def overview(request: web.Request) -> web.Response:
    """Show agents, event rate, the riskiest processes, live alerts and hub health."""
    return render(request, "overview.html", page="overview")


@routes.get("/agents/{agent_id:[A-Za-z0-9._-]{1,64}}")
async def agent(request: web.Request) -> web.Response:
    """Show one agent: status, resource chart, processes, process tree, events, commands."""
    return render(request, "agent.html", page="agent", agent_id=request.match_info["agent_id"])


@routes.get("/alerts")
async def alerts(request: web.Request) -> web.Response:
    """Filter alerts; acknowledge and resolve them."""
    return render(request, "alerts.html", page="alerts")


@routes.get("/certificates")
async def certificates(request: web.Request) -> web.Response:
    """List agent certificates; upload, issue from a CSR and revoke them."""
    return render(request, "certificates.html", page="certificates")


@routes.get("/webhooks")
async def webhooks(request: web.Request) -> web.Response:
    """List webhook subscriptions; add, enable, disable and delete them."""
    return render(request, "webhooks.html", page="webhooks")
