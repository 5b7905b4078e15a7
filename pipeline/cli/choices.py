"""CLI choices read from the target records when a command runs, so a target registered after import
(`bitdeploy.core.targets.register`) appears in --target and --backend without editing any command."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import click

from bitdeploy.core import targets


class LiveChoice(click.Choice[str]):
    """A click.Choice whose values come from a function, read at every use."""

    def __init__(self, values: Callable[[], Iterable[str]]) -> None:
        self._values = values
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._values())

    @choices.setter
    def choices(self, _value: object) -> None:  # click.Choice.__init__ assigns it; the function is the source
        pass


def backends() -> LiveChoice:
    """--backend NAME: every registered runtime backend."""
    return LiveChoice(targets.backend_names)


def target_names_and_all() -> list[str]:
    return [*targets.target_names(), "all"]


class TargetList(LiveChoice):
    """--target NAME[,NAME...] or all: registered targets, comma-separated, given back as one normalised string."""

    name = "target list"

    def __init__(self) -> None:
        super().__init__(target_names_and_all)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "[" + "|".join(self.choices) + "][,...]"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        names = [n.strip() for n in str(value).split(",") if n.strip()]
        if not names:
            self.fail("give a target name, a comma list of them, or all", param, ctx)
        for n in names:
            if n not in self.choices:
                self.fail(f"{n!r} is not one of {', '.join(self.choices)} (comma-separate several)", param, ctx)
        if "all" in names and len(names) > 1:
            self.fail("all already means every target; give all alone or a list of names", param, ctx)
        return ",".join(dict.fromkeys(names))
