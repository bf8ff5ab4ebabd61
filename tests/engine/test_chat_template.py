"""A chat template for a tokenizer without one: ``load_tokenizer(path, chat_template)`` (a Jinja
template, a .jinja file or a tokenizer folder), saved with the model; a clear error naming the
key when chat is rendered without one."""

import json
import shutil

import pytest

from alignkit.config import ConfigError
from alignkit.data.formats import build_dataset
from alignkit.data.io import DataError
from alignkit.engine.models import load_tokenizer
from alignkit.engine.tokenizer import CHAT_TEMPLATE

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


def without_template(src, dst):
    """A copy of the model folder ``src`` whose tokenizer has no chat template."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def plain(tiny_base, tmp_path_factory):
    return without_template(tiny_base, tmp_path_factory.mktemp("plain") / "model")


def test_a_template_from_text_file_or_folder_renders_as_the_original(tiny_base, plain, tmp_path):
    original = load_tokenizer(tiny_base)
    expect = original.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert load_tokenizer(plain).chat_template is None
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    for given in (CHAT_TEMPLATE, str(tmp_path / "chat.jinja"), str(tiny_base)):
        tok = load_tokenizer(plain, given, chat=True)
        assert tok.chat_template == CHAT_TEMPLATE
        assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == expect
    # saved with the tokenizer: a later stage that loads the saved model renders the same
    tok.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved", chat=True).chat_template == CHAT_TEMPLATE
    # a template replaces the tokenizer's own
    assert load_tokenizer(tiny_base, "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                          "{% endfor %}").apply_chat_template(CHAT, tokenize=False) == \
        "<|bos|>Be brief.Hi thereHello.Bye"


def test_chat_without_a_template_is_an_error_naming_the_key(plain, tmp_path):
    with pytest.raises(ConfigError, match=r"the tokenizer of .*plain.* has no chat template and this "
                                          r"stage renders chat; give one with data.chat_template="):
        load_tokenizer(plain, chat=True, key="data.chat_template")
    with pytest.raises(ConfigError, match=r"^chat_template: the chat template does not render a user "
                                          r"turn: TemplateSyntaxError"):
        load_tokenizer(plain, "{% if %}")
    with pytest.raises(ConfigError, match=r"^chat_template: 'no/such.jinja' is no Jinja template"):
        load_tokenizer(plain, "no/such.jinja")
    # message records without a template (no chat flag asked for one): the record is named
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT[:3]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1: chat messages, but the tokenizer has no chat "
                                        r"template; give one with data.chat_template"):
        build_dataset(data, load_tokenizer(plain), max_length=64)
