def test_loss_stays_a_free_name(tmp_path):
    """`loss` starts a member line only before a kind: a variable or submodule may still be called `loss`."""
    from dslc.api import check_file

    spec = tmp_path / "free.model"
    spec.write_text(
        "use std\n\nconfig C:\n    vocab: int = 20\n    dim: int = 8\n\n"
        "model M(C): causal_lm\n    embed = Embedding(vocab, dim)\n    loss = Linear(dim, vocab)\n"
        "    loss z_loss(coef = 0.5)\n\n"
        "    forward(ids: [B, T] i64) -> [B, T, vocab]:\n        loss = embed(ids)\n        return loss(loss)\n"
    )
    program = check_file(spec).program
    assert [(d.kind, [k for k, _ in d.options]) for d in program.losses] == [("z_loss", ["coef"])]
