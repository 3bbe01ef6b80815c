"""``template alias set TPL ALIAS [--transfer]`` — claim, move or clear an alias (TPL-18).

Wire: ADMIN {command: "template alias set", args: {template, alias, transfer?, request_id}}
→ RESULT {template_id, alias, previous, released_from, changed}.

A snapshot id → AliasNotApplicableToSnapshot; a DELETING template → TemplateNotFound; a claim
needs READY (TemplateNotReady); an alias held by another template → DuplicateTemplate unless
``--transfer``, which releases and claims in one transaction. An empty ALIAS clears (any
non-DELETING template; clearing nothing is a no-op). Setting the alias a template already
holds is a no-op too, so a retried request answers the same.
"""
from __future__ import annotations

import asyncio

from protocol import ids
from protocol.errors import AliasNotApplicableToSnapshot, InvalidAlias
from protocol.schema import Bool, Str

from ..command import Arg, Command
from ._jobs import TEMPLATE, resolve_template, store

ALIAS = Arg("alias", "the alias to claim; \"\" clears the template's alias", Str(256, None, 0, "alias"),
            positional=True, required=True, metavar="ALIAS")
TRANSFER = Arg("transfer", "take the alias from the template holding it (release + claim in one transaction)",
               Bool(), flag=True, default=False)


class TemplateAliasSet(Command):
    name = "template alias set"
    summary = "claim, move (--transfer) or clear (\"\") a template's alias"
    args = (TEMPLATE, ALIAS, TRANSFER)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        name, alias = args["template"], args["alias"]
        if name.startswith("snap-"):
            raise AliasNotApplicableToSnapshot(f"{name} is a snapshot; aliases name templates only",
                                               {"snapshot": name})
        if alias and not ids.valid("alias", alias):
            raise InvalidAlias(f"alias {alias!r} must be [a-z0-9][a-z0-9-]{{0,63}}, not starting with tpl-, snap- "
                               "or sbx-", {"field": "alias", "alias": alias})
        tpl = await resolve_template(ctx, name)
        store(ctx)
        return await asyncio.to_thread(ctx.templates.rows.set_alias, tpl["id"], alias,
                                       transfer=bool(args.get("transfer")))

    def render(self, result, console):  # type: ignore[no-untyped-def]
        tpl, alias = result["template_id"], result["alias"]
        if not result["changed"]:
            console.print(f"template {tpl}: alias unchanged ({alias or 'none'})")
        elif alias is None:
            console.print(f"template {tpl}: alias {result['previous']} cleared")
        else:
            moved = f" (taken from {result['released_from']})" if result["released_from"] else ""
            console.print(f"template {tpl}: alias {alias}{moved}")
