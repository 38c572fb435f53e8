"""The engine `make engine` builds serves SmolLM2 over the OpenAI API."""

import httpx


def test_models_and_chat(vllm_url):
    with httpx.Client(base_url=vllm_url, timeout=60) as client:
        models = client.get("/v1/models").raise_for_status().json()
        assert "smollm2" in [m["id"] for m in models["data"]]

        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is 12 + 7?"}],
            "temperature": 0,
            "max_tokens": 32,
        }
        reply = client.post("/v1/chat/completions", json=body).raise_for_status().json()
        assert reply["choices"][0]["message"]["content"].strip()
