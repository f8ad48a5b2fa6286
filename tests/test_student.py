import pytest
import torch
from transformers import BertForMaskedLM, DistilBertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from pipeline.errors import DistilcacheError
from student_train.config import StudentConfig
from student_train.model import DistillModule, init_from_teacher, student_config, teacher_layers
from tests.conftest import tiny_bert_config


def test_layer_map_is_distilberts():
    assert teacher_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert teacher_layers(6, 3) == [0, 3, 5]
    assert teacher_layers(4, 4) == [0, 1, 2, 3]
    assert teacher_layers(12, 1) == [0]


def _teacher(layers=4, **kw) -> BertForMaskedLM:
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_bert_config(120, num_hidden_layers=layers, **kw)).eval()
    with torch.no_grad():  # non-trivial token-type embeddings, so folding them matters
        teacher.bert.embeddings.token_type_embeddings.weight.normal_()
    return teacher


def test_init_copies_the_documented_layers_embeddings_and_head():
    teacher = _teacher(layers=4)
    student = DistilBertForMaskedLM(student_config(StudentConfig(layers=2), teacher.config))
    assert init_from_teacher(student, teacher.state_dict(), teacher.config) == [0, 3]
    t, s = teacher.bert, student.distilbert
    for i, j in enumerate([0, 3]):
        torch.testing.assert_close(
            s.transformer.layer[i].attention.q_lin.weight, t.encoder.layer[j].attention.self.query.weight
        )
        torch.testing.assert_close(s.transformer.layer[i].ffn.lin2.bias, t.encoder.layer[j].output.dense.bias)
        torch.testing.assert_close(
            s.transformer.layer[i].output_layer_norm.weight, t.encoder.layer[j].output.LayerNorm.weight
        )
    torch.testing.assert_close(s.embeddings.word_embeddings.weight, t.embeddings.word_embeddings.weight)
    folded = t.embeddings.position_embeddings.weight + t.embeddings.token_type_embeddings.weight[0]
    torch.testing.assert_close(s.embeddings.position_embeddings.weight, folded)
    torch.testing.assert_close(student.vocab_transform.weight, teacher.cls.predictions.transform.dense.weight)
    torch.testing.assert_close(student.vocab_projector.bias, teacher.cls.predictions.bias)
    assert student.vocab_projector.weight.data_ptr() == s.embeddings.word_embeddings.weight.data_ptr()


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_student_with_all_teacher_layers_reproduces_the_teacher(arch):
    if arch == "bert":
        teacher = _teacher(layers=3)
    else:
        torch.manual_seed(0)
        teacher = RobertaForMaskedLM(
            RobertaConfig(
                vocab_size=120,
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=66,
                pad_token_id=1,
            )
        ).eval()
    cfg = StudentConfig(layers=3, dropout=0.0)
    student = DistilBertForMaskedLM(student_config(cfg, teacher.config)).eval()
    init_from_teacher(student, teacher.state_dict(), teacher.config)
    ids = torch.randint(5, 120, (3, 20))
    with torch.no_grad():
        diff = (student(input_ids=ids).logits - teacher(input_ids=ids).logits).abs().max()
    assert diff < 1e-5, f"function-preserving init broken: max |dlogit| {diff}"


def test_bert_student_and_refusals():
    teacher = _teacher(layers=4)
    bert_student = BertForMaskedLM(tiny_bert_config(120, num_hidden_layers=2))
    assert init_from_teacher(bert_student, teacher.state_dict(), teacher.config) == [0, 3]
    torch.testing.assert_close(
        bert_student.bert.encoder.layer[1].attention.self.key.weight,
        teacher.bert.encoder.layer[3].attention.self.key.weight,
    )
    narrow = DistilBertForMaskedLM(student_config(StudentConfig(layers=2, hidden_size=16), teacher.config))
    with pytest.raises(DistilcacheError, match="needs the teacher's width"):
        init_from_teacher(narrow, teacher.state_dict(), teacher.config)
    module = DistillModule(narrow, teacher_hidden=32)
    logits, hidden = module(torch.randint(5, 120, (2, 9)), torch.ones(2, 9, dtype=torch.long))
    assert logits.shape == (2, 9, 120) and hidden.shape == (2, 9, 32)
