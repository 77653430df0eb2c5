from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_models_load_through_from_pretrained(tiny_llama, tiny_qwen2):
    for path in (tiny_llama, tiny_qwen2):
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = tok("the movie was great", return_tensors="pt").input_ids
        assert model(input_ids=ids).logits.shape[-1] == len(tok)
