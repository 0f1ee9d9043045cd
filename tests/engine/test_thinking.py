from qforge.engine.thinking import join_think, message_think, split_think


def test_split_think_follows_the_template_rule():
    assert split_think("<think>\nstep 1\nstep 2\n</think>\n\nĐáp án: 3") == ("step 1\nstep 2", "Đáp án: 3")
    assert split_think("no block here") == (None, "no block here")
    assert split_think("<think>cut by max_tokens") == (None, "<think>cut by max_tokens")
    assert split_think("<think></think>A") == ("", "A")
    # a stray second </think>: the answer is what follows the last one, as the chat template renders it
    assert split_think("<think>a</think>b</think>c") == ("a", "c")


def test_message_think_prefers_the_reasoning_field_and_roundtrips_join():
    assert message_think({"role": "assistant", "content": "x", "reasoning_content": "r"}) == ("r", "x")
    assert message_think({"role": "assistant", "content": "<think>r</think>x"}) == ("r", "x")
    assert message_think({"role": "assistant", "content": "x"}) == ("", "x")
    assert split_think(join_think("r", "x")) == ("r", "x")
    assert join_think(None, "<think>r</think>x") == "<think>r</think>x"
