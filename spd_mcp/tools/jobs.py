"""The job tool: get_job (a long call answers with a job handle and keeps running)."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.service.jobs import MAX_WAIT_S, JobInfo, job_book

from .common import READ_ONLY, Progress, state, strict_tool


class JobReport(BaseModel):
    """A job's state and, once it is done, every field of its tool's result besides."""

    model_config = ConfigDict(extra="allow")
    job: JobInfo


async def get_job(
    ctx: Context,
    job_id: int,
    wait_s: Annotated[float, Field(ge=0, le=MAX_WAIT_S, description="wait up to this long for "
                                   "it to finish")] = 0,
) -> JobReport:
    """A background job's progress; once done, the result its tool would have returned (or its
    error). A call that runs long answers {"job": {"job_id": ...}} and keeps running."""
    st = state(ctx)
    book = job_book(st)
    job = await book.wait(job_id, wait_s, Progress(ctx, f"{book.get(job_id).tool} "
                                                        f"(job {job_id})"))
    info = book.info(job)
    if info.status != "done":
        return JobReport(job=info)
    return JobReport(job=info, **job.result().model_dump(mode="json", by_alias=True))


def tools() -> list[Tool]:
    return [strict_tool(get_job, READ_ONLY, "Background job status")]
