// NOT built in this repository (see ../../../../../../README.md).
package dev.fedge.sample

import dev.fedge.android.client.Client
import dev.fedge.android.client.ClientConfig
import dev.fedge.android.client.EligibilityPolicy
import dev.fedge.android.os.AndroidConditions
import dev.fedge.android.os.TrainingJobService
import java.io.File

/** The job the system starts when the phone is idle, charging and on an unmetered network. */
class SampleTrainingJob : TrainingJobService() {
    override fun createClient(): Client = Client(
        coordinator = BuildConfig.FEDGE_COORDINATOR,
        stateDir = File(filesDir, "fedge"),
        data = SampleExamples.load(this),
        conditions = AndroidConditions(this),
        policy = EligibilityPolicy.android(),
        config = ClientConfig(enrollmentToken = BuildConfig.FEDGE_ENROLLMENT_TOKEN),
    )
}
