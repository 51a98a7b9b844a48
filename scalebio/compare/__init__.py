"""The closed loop around the bilevel run: fine-tuning one model on a mixture (``scalebio train``)
and comparing mixtures by the test loss of models fine-tuned on them (``scalebio compare``)."""
