"""The prompt template sandbox: rendering, missing variables named, and known sandbox escapes and resource
attacks refused."""

from __future__ import annotations

import pytest

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.tasks.templating import MAX_OUTPUT_CHARS, render_template, template_variables


def test_renders_variables_loops_and_filters() -> None:
    text = (
        "Hi {{ name | upper }}:{% for x in items %} {{ loop.index }}={{ x }}{% endfor %}"
        "{% if extra is defined %}!{% endif %}"
    )
    assert render_template(text, {"name": "ann", "items": ["a", "b"]}) == "Hi ANN: 1=a 2=b"
    assert template_variables(text) == ["extra", "items", "name"]


def test_missing_variable_is_a_400_naming_it() -> None:
    with pytest.raises(InvalidRequestError) as err:
        render_template("Dear {{ customer }}, {{ issue }}", {"customer": "Bo"})
    assert err.value.param == "prompt_template.variables.issue" and "'issue'" in err.value.message


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ x.__class__.__base__.__subclasses__() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].system('id') }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ request.application.__globals__ }}",
    "{{ config.__class__.__init__.__globals__ }}",
    "{{ x|attr('__class__') }}",
    "{{ ''['__class__'] }}",
    "{{ items.append(1) }}",
    "{{ items.pop() }}",
    "{{ {}.update(a=1) }}",
    "{{ range.__self__ }}",
    "{{ ''.format.__self__.__class__ }}",
    "{{ '{0.__class__}'.format(x) }}",
    "{% import 'os' as os %}",
    "{% include '/etc/passwd' %}",
    "{% extends '/etc/passwd' %}",
    "{% from 'x' import y %}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_known_sandbox_escapes_are_refused(template: str) -> None:
    with pytest.raises(InvalidRequestError):
        render_template(template, {"x": 1, "items": [1, 2]})


BOMBS = [
    "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "{% for a in items %}{% for b in items %}{% for c in items %}{% endfor %}{% endfor %}{% endfor %}",
    "{{ range(10**9) }}",
    "{{ 'a' * 10**9 }}",
    "{{ ['a'] * 10**9 }}",
    "{{ 'a'.center(10**9) }}",
    "{{ 'a'.ljust(10**9) }}",
    "{{ 9 ** 999999 }}",
    "{% for i in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}",
    "{{ 'ab' | replace('', 'x' * 1000) | replace('x', 'y' * 1000) }}",
]


@pytest.mark.parametrize("template", BOMBS)
def test_resource_bombs_stop_at_the_bounds(template: str) -> None:
    with pytest.raises(InvalidRequestError):
        out = render_template(template, {"items": list(range(100))})
        assert len(out) <= MAX_OUTPUT_CHARS  # never reached: the render must refuse
