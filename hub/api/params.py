"""Path parameter models shared by route tables."""

from __future__ import annotations

from pydantic import BaseModel, Field

from hub.models import AGENT_ID_PATTERN


class AgentPath(BaseModel):
    agent_id: str = Field(pattern=AGENT_ID_PATTERN, description="the agent id (its certificate CN)")
