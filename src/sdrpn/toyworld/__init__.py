"""The synthetic fine-detail world (`world`), the recipe that trains the embedded demo MLLM (`recipe`) and its
shipped weights (`weights/mllm/`, a LlavaForConditionalGeneration + LlavaProcessor folder)."""
